"""Recipes: the built-in callbacks by short name, the `[log]` section reaching the engine and the Accelerator."""

from __future__ import annotations

import pytest

from accelengine.build import build_engine
from accelengine.callbacks import EMA, EarlyStopping, GradNormMonitor, NanGuard, ProgressBar, Trackers
from accelengine.recipe import validate
from accelengine.recipe.components import BUILTINS, resolve

RECIPE = {
    "model": {"_component_": "mlp", "in_features": 16, "out_features": 4, "hidden": [8]},
    "loss": "cross_entropy",
    "optim": {"_component_": "sgd", "lr": 0.1},
    "data": {"batch_size": 16, "train": {"dataset": {"_component_": "synthetic_classification", "samples": 32}}},
    "trainer": {"steps": 2, "device": "cpu"},
}


def test_every_builtin_callback_has_a_short_name():
    import accelengine.callbacks as callbacks

    named = {resolve(name) for name in BUILTINS}
    for cls in (getattr(callbacks, n) for n in callbacks.__all__ if n not in ("HOOKS", "Callback")):
        assert cls in named, cls


def test_callbacks_and_log_from_a_recipe(tmp_path):
    recipe = validate(
        {
            **RECIPE,
            "callbacks": [
                {"_component_": "ema", "momentum": 0.99, "use_for_eval": True},
                {"_component_": "early_stopping", "monitor": "val/loss", "patience": 2},
                "grad_norm",
                {"_component_": "nan_guard", "mode": "skip"},
                {"_component_": "progress", "metric": "val/loss"},
            ],
            "log": {"trackers": ["tensorboard"], "project": "demo", "progress": True, "nan_guard": "stop"},
        }
    )
    engine = build_engine(recipe, tmp_path)
    kinds = {type(cb) for cb in engine.callbacks}
    assert {EMA, EarlyStopping, GradNormMonitor, NanGuard, ProgressBar, Trackers} <= kinds
    (guard,) = [cb for cb in engine.callbacks if isinstance(cb, NanGuard)]
    assert guard.mode == "skip"  # the recipe's table replaced the default guard
    assert [str(t) for t in engine.accelerator.log_with] == ["tensorboard"]
    (tracker,) = [cb for cb in engine.callbacks if isinstance(cb, Trackers)]
    assert tracker.project == "demo"


def test_bad_callback_arguments_are_reported():
    from accelengine import RecipeError

    with pytest.raises(RecipeError, match=r"callbacks\[0\].momentom.*did you mean `momentum`"):
        validate({**RECIPE, "callbacks": [{"_component_": "ema", "momentom": 0.9}]})
    with pytest.raises(RecipeError, match=r"log\.nan_guard"):
        validate({**RECIPE, "log": {"nan_guard": "ignore"}})
