"""From a validated recipe to a ready engine: seed first, then every component."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from accelengine.engine import Engine
from accelengine.errors import EngineError
from accelengine.recipe.components import instantiate
from accelengine.recipe.schema import Recipe
from accelengine.recipe.validate import recipe_to_dict


def build_engine(recipe: Recipe, out_dir: str | Path | None = None, resume_from: str | Path | None = None) -> Engine:
    """Instantiate every component of the recipe and the engine class it names."""
    set_seed(recipe.seed)  # before the model is built: its initial weights depend on it
    model = build_component("model", recipe.model)
    if not isinstance(model, nn.Module):
        raise EngineError(f"`model`: `{recipe.model.target}` gave a {type(model).__name__}, not a torch.nn.Module")
    data = {name: build_component(f"data.{name}.dataset", s.dataset) for name, s in recipe.data.loaders.items()}
    for name, ds in data.items():
        if ds is None:
            raise EngineError(f"`data.{name}.dataset` returned nothing: the component must return a data set")
    loss = build_component("loss", recipe.loss) if recipe.loss else None
    metrics = {name: build_component(f"metrics.{name}", spec) for name, spec in recipe.metrics.items()}
    callbacks = [build_component(f"callbacks[{i}]", spec) for i, spec in enumerate(recipe.callbacks)]
    optimizer = _factory("optim", recipe.optim) if recipe.optim else None
    scheduler = _factory("scheduler", recipe.scheduler) if recipe.scheduler else None
    engine = build_component(
        "engine",
        recipe.engine,
        model=model,
        data=data,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        metrics=metrics,
        callbacks=callbacks,
        config=recipe.trainer,
        data_config=recipe.data,
        checkpoint_config=recipe.checkpoint,
        log_config=recipe.log,
        seed=recipe.seed,
        out_dir=out_dir,
        recipe=recipe_to_dict(recipe),
        resume_from=resume_from,
    )
    if not isinstance(engine, Engine):
        raise EngineError(f"`engine` must name accelengine.Engine or a subclass, got {type(engine).__name__}")
    return engine


def build_component(path: str, spec: Any, *args: Any, **runtime: Any) -> Any:
    """`instantiate`, with a value the component refuses (a `TypeError` or `ValueError` as it is built: a learning
    rate of "fast", a negative size) reported as a recipe error naming the key, and where it was raised."""
    try:
        return instantiate(spec, *args, **runtime)
    except (TypeError, ValueError) as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise EngineError(
            f"`{path}`: building `{spec.target}` failed: {type(err).__name__}: {err} (raised at "
            f"{frame.filename}:{frame.lineno}); check the values given under `{path}` in the recipe"
        ) from err


def _factory(path: str, spec: Any):
    """Components that need run-time arguments (parameters, optimizer) are built by the engine, later. The engine
    offers `total_steps` to a scheduler factory; `instantiate` passes it on only to targets that accept it."""

    def make(first: Any, total_steps: int | None = None) -> Any:
        return build_component(path, spec, first, **({} if total_steps is None else {"total_steps": total_steps}))

    return make
