"""Recipe files to finished run directories: what `accelengine run` and `accelengine eval` do."""

from __future__ import annotations

import datetime as _dt
import logging
import tempfile
from pathlib import Path
from typing import Any

from accelengine.build import build_engine
from accelengine.errors import EngineError
from accelengine.recipe.validate import load_recipe, recipe_folder
from accelengine.restart import CHECKPOINT_DIR, plan_resume, resolve_checkpoint
from accelengine.rundir import default_run_dir

logger = logging.getLogger("accelengine")


def run(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    resume: str = "auto",
) -> dict[str, Any]:
    """Validate the recipe, build everything, train (or evaluate) and return the summary (also `summary.json`).

    `resume`: `auto` continues from the newest complete checkpoint in `out` if there is one; `never` refuses a
    non-empty `out`; a path continues from that checkpoint (its run directory is the default `out`).
    """
    recipe = load_recipe(recipe_path, overrides)
    if out is None and resume not in ("auto", "never"):
        checkpoint = resolve_checkpoint(resume)
        out = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_DIR else None
    out_dir = Path(out) if out is not None else default_run_dir(recipe.name)
    engine = build_engine(recipe, out_dir, resume_from=plan_resume(out_dir, resume))
    engine.code_root = recipe_folder(recipe_path)  # `log.copy_code` globs are relative to the recipe
    return engine.fit()


def evaluate(
    recipe_path: str | Path,
    checkpoint: str | Path,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    ema: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint's weights on every evaluation set of the recipe (its `train` set is left out)."""
    recipe = load_recipe(recipe_path, overrides)
    source = resolve_checkpoint(checkpoint)
    recipe.data.loaders.pop("train", None)
    if not recipe.data.loaders:
        raise EngineError(f"{recipe_path} has no evaluation sets (every `[data.<name>]` other than `train`)")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = source.parent.parent if source.parent.name == CHECKPOINT_DIR else None
    out_dir = Path(out) if out is not None else (run_dir / f"eval-{stamp}" if run_dir else default_run_dir(recipe.name))
    with tempfile.TemporaryDirectory(prefix="accelengine-") as scratch:
        # EMA weights live in the callbacks part: export them to a scratch file the engine loads like any weights
        weights = export_weights(source, Path(scratch) / "ema.safetensors", ema=True) if ema else source
        recipe.checkpoint.init_from = str(weights)
        engine = build_engine(recipe, out_dir, resume_from=plan_resume(out_dir, "never"))
        return engine.fit()


def export_weights(checkpoint: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write a checkpoint's model weights (or its EMA weights) alone to a `.safetensors` file."""
    from safetensors.torch import save_file

    from accelengine.checkpoint import read_checkpoint

    source = resolve_checkpoint(checkpoint)
    if ema:
        callbacks = read_checkpoint(source, parts=["callbacks", "model"]).parts
        state = callbacks["callbacks"].get("ema")
        if state is None:
            raise EngineError(f"checkpoint {source} holds no EMA weights: train with the `ema` callback")
        weights = {k: state["params"].get(k, state["buffers"].get(k)) for k in callbacks["model"]}
    else:
        weights = read_checkpoint(source, parts=["model"]).parts["model"]
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(target), metadata={"source": str(source)})
    return target
