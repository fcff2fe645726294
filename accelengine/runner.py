"""Recipe files to finished run directories: what `accelengine run` and `accelengine eval` do."""

from __future__ import annotations

import datetime as _dt
import logging
import tempfile
from pathlib import Path
from typing import Any

from accelengine.build import build_engine
from accelengine.errors import EngineError
from accelengine.preemption import EarlySignals
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
    _check_can_make(out_dir)
    with EarlySignals(recipe.checkpoint.signals) as early:
        engine = build_engine(recipe, out_dir, resume_from=plan_resume(out_dir, resume))
        if out is None:
            _agree_on_run_dir(engine)
        engine.code_root = recipe_folder(recipe_path)  # `log.copy_code` globs are relative to the recipe
        early.hand_to(engine.preemption)
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
    _check_can_make(out_dir)
    with (
        EarlySignals(recipe.checkpoint.signals) as early,
        tempfile.TemporaryDirectory(prefix="accelengine-") as scratch,
    ):
        # EMA weights live in the callbacks part: export them to a scratch file the engine loads like any weights
        weights = export_weights(source, Path(scratch) / "ema.safetensors", ema=True) if ema else source
        recipe.checkpoint.init_from = str(weights)
        engine = build_engine(recipe, out_dir, resume_from=plan_resume(out_dir, "never"))
        if out is None:
            _agree_on_run_dir(engine)
        early.hand_to(engine.preemption)
        return engine.fit()


def _check_can_make(out_dir: Path) -> None:
    """An `--out` below a file is a mistake on the command line: say so before anything is built, rather than fail
    the run when its first file is written (and again, with a traceback, when its summary is)."""
    existing = next((p for p in out_dir.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise EngineError(f"--out {out_dir}: {existing} is a file, not a directory: choose a directory for the run")


def _agree_on_run_dir(engine: Any) -> None:
    """Every process writes into rank 0's default run directory. Each named its own before the processes could talk,
    from the clock in whole seconds: processes that start a moment apart name different ones, and a checkpoint, which
    every rank writes into, then fails."""
    if engine.accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list

    engine.out_dir = Path(broadcast_object_list([str(engine.out_dir)])[0])


def export_weights(checkpoint: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write a checkpoint's model weights (or its EMA weights) alone to a `.safetensors` file."""
    from safetensors import SafetensorError
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
    if target.is_dir():
        raise EngineError(f"--out {target} is a directory: name the .safetensors file to write")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(target), metadata={"source": str(source)})
    except (OSError, SafetensorError) as err:
        raise EngineError(f"cannot write {target}: {err}") from err
    return target
