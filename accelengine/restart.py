"""What a checkpoint of a run holds, how a run continues from one, and which run directory resumes what.

The storage (atomic, pickle-free, verified) lives in `checkpoint.py`; this module decides the contents:

- shared parts (rank 0): `model` (plain weights), `optimizer`, `scheduler`, `scaler`, `engine` (the loop position
  and counters), `callbacks` (every callback that has a `state_dict`);
- per-rank parts: `rng` (python, numpy, torch CPU and accelerator generators) and `losses` (this rank's training
  losses since the last log step, so the next logged value is the same as without the interruption);
- meta: step, epoch, last metrics, the resolved recipe and its hash, world size, versions.

The sampler's position needs no state of its own: the shuffling order is a function of (seed, epoch) and the
position within the epoch is `batch_in_epoch`, skipped by index on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from accelengine.checkpoint import CheckpointError, branch_from, find_latest, read_checkpoint
from accelengine.errors import EngineError

if TYPE_CHECKING:
    from accelengine.engine import Engine

logger = logging.getLogger("accelengine")

CHECKPOINT_DIR = "checkpoints"

# Recipe keys that may differ between the run that saved a checkpoint and the run that resumes it. Everything else
# (model, optimizer and scheduler kind, loss, seed, training data and batch size, accumulation) must be equal.
RESUMABLE_CHANGES = (
    "name",
    "trainer.epochs",
    "trainer.steps",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.max_grad_norm",
    "trainer.mixed_precision",
    "trainer.device",
    "trainer.deterministic",
    "checkpoint",
    "metrics",
    "callbacks",
    "log",
    "data.num_workers",
    "data.pin_memory",
    "data.<eval sets>",
)


# --------------------------------------------------------------------------------------------------------- RNG --
_RNG_GETTERS = {"python": random.getstate, "numpy": np.random.get_state, "torch": torch.get_rng_state}
_RNG_SETTERS = {"python": random.setstate, "numpy": np.random.set_state, "torch": torch.set_rng_state}


def rng_state(kinds: Iterable[str] | None = None) -> dict[str, Any]:
    """Every random generator this process draws from (`kinds`: only those, e.g. `LOADER_RNG`)."""
    state = {kind: get() for kind, get in _RNG_GETTERS.items() if kinds is None or kind in kinds}
    if (kinds is None or "cuda" in kinds) and torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# What a loader draws from when an epoch's iterator starts: the worker base seed, and the seed of a shuffling sampler
# that has no generator of its own, come from torch's CPU generator (the engine's samplers and Accelerate's seedable
# one are seeded by (seed, epoch) and draw nothing). An epoch's start keeps this alone: it is cheap to take every
# epoch (numpy's state alone costs ~35 us), and the data set's own draws (augmentation) must not be replayed.
LOADER_RNG = ("torch",)


def iterate_from_rng(loader: Any, start_rng: dict[str, Any] | None):
    """Iterate `loader` as if it had started with the random state `start_rng` (the epoch's start), then carry on
    with the current random state: what a resumed epoch needs so its iterator (and workers) draw the same seeds,
    while the data set's own draws (augmentation) continue from the checkpoint's state. Only the generators
    `start_rng` holds are rewound (older checkpoints hold them all)."""
    if start_rng is None:
        yield from loader
        return
    current = rng_state(start_rng)
    set_rng_state(start_rng)
    iterator = iter(loader)
    if not isinstance(iterator, Generator):  # a torch loader's iterator has drawn its seeds: batches come after
        set_rng_state(current)
        yield from iterator
        return
    # A loader written as a generator (Accelerate's) draws its seeds at its first batch, together with that batch
    # and the one it reads ahead: those two batches' own draws come from the epoch's start (see docs/checkpoints.md).
    first = next(iterator, _END)
    set_rng_state(current)
    if first is _END:
        return
    yield first
    yield from iterator


_END = object()


def set_rng_state(state: dict[str, Any]) -> None:
    """Set the generators `state` holds (all of them from `rng_state()`; a subset from `rng_state(kinds)`)."""
    for kind, value in state.items():
        if kind == "cuda":
            # `trainer.device` may change on resume (docs/checkpoints.md): a run saved on GPUs continues on the CPU,
            # where nothing draws from CUDA generators
            if not torch.cuda.is_available():
                logger.warning("the saved CUDA random states are not restored: no CUDA device is visible")
                continue
            torch.cuda.set_rng_state_all(value)
        elif kind in _RNG_SETTERS:
            _RNG_SETTERS[kind](value)
        else:
            raise EngineError(f"unknown random generator {kind!r} in a saved random state")


# ------------------------------------------------------------------------------------------------------ recipe --
def recipe_hash(recipe: dict[str, Any] | None) -> str | None:
    if recipe is None:
        return None
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume_view(recipe: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved recipe that must not change on resume."""
    data = recipe.get("data", {})
    train = data.get("train", {})
    view = {
        "engine": recipe.get("engine"),
        "model": recipe.get("model"),
        "loss": recipe.get("loss"),
        "seed": recipe.get("seed"),
        # the optimizer's state holds its hyper-parameters: a changed `lr` would be silently overwritten
        "optim": recipe.get("optim"),
        "scheduler": recipe.get("scheduler"),
        "data.train": {k: v for k, v in train.items() if k not in ("num_workers",)},
        "data.train.batch_size": train.get("batch_size") or data.get("batch_size"),
        "data.input_key": data.get("input_key"),
        "data.target_key": data.get("target_key"),
        "trainer.grad_accum": recipe.get("trainer", {}).get("grad_accum"),
    }
    return view


def check_compatible(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """Refuse to resume when the recipe changed in a way the checkpoint cannot follow."""
    if saved is None or current is None:
        return
    old, new = _resume_view(saved), _resume_view(current)
    changed = [k for k in old if old[k] != new[k]]
    if changed:
        detail = "; ".join(
            f"`{k}` was {json.dumps(old[k], default=str)}, now {json.dumps(new[k], default=str)}" for k in changed
        )
        raise EngineError(
            f"the recipe changed in ways a resume cannot follow: {detail}. Resume with the original values, or "
            "start a new run with another --out (to fine-tune from this run, set `checkpoint.init_from` to its "
            "checkpoint). What may change on resume: " + ", ".join(RESUMABLE_CHANGES)
        )


# ---------------------------------------------------------------------------------------------- save / restore --
def capture(engine: Engine) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(shared parts, per-rank parts, meta) describing the run exactly as it is now."""
    import accelerate

    import accelengine

    acc = engine.accelerator
    shared: dict[str, Any] = {"engine": engine.state.state_dict()}
    if engine.state.stop_resumable:  # a pause (preemption, time limit) is this process's affair, not the run's
        shared["engine"].update(should_stop=False, stop_reason="")
    if acc.is_main_process:
        shared["model"] = acc.get_state_dict(engine.model)
        if engine.optimizer is not None:
            shared["optimizer"] = engine.optimizer.state_dict()
        if engine.scheduler is not None:
            shared["scheduler"] = engine.scheduler.state_dict()
        if acc.scaler is not None:
            shared["scaler"] = acc.scaler.state_dict()
        shared["callbacks"] = {cb.key: cb.state_dict() for cb in engine.callbacks if hasattr(cb, "state_dict")}
    else:
        acc.get_state_dict(engine.model)  # collective for sharded models: every rank must take part
    per_rank = {
        "rng": {"now": rng_state(), "epoch_start": engine.epoch_start_rng},
        "losses": engine.loss_window.state_dict(),  # this process's training losses not yet logged
    }
    shared["engine"]["accumulation_counter"] = acc.step  # where Accelerate is within a gradient accumulation
    meta = {
        "step": engine.state.step,
        "epoch": engine.state.epoch,
        "batch_in_epoch": engine.state.batch_in_epoch,
        "metrics": dict(engine.state.last_eval),
        "world_size": acc.num_processes,
        # the effective value: with `trainer.grad_accum` unset it comes from the launcher, which no recipe records
        "grad_accum": acc.gradient_accumulation_steps,
        "recipe": engine.recipe,
        "recipe_hash": recipe_hash(engine.recipe),
        "versions": {
            "accelengine": accelengine.__version__,
            "torch": str(torch.__version__),
            "accelerate": accelerate.__version__,
        },
    }
    return shared, per_rank, meta


def restore(engine: Engine, path: Path) -> None:
    """Load everything `capture` saved; strict: a part that does not fit is an error naming it."""
    acc = engine.accelerator
    ckpt = read_checkpoint(path, rank=acc.process_index)
    meta, parts = ckpt.meta, ckpt.parts
    if meta.get("world_size") != acc.num_processes:
        raise EngineError(
            f"checkpoint {path} was written by {meta.get('world_size')} process(es) and this run has "
            f"{acc.num_processes}: resume with the same number of processes (random states are per process)"
        )
    check_compatible(meta.get("recipe"), engine.recipe)
    saved_accum = meta.get("grad_accum")  # absent from checkpoints of earlier versions
    if saved_accum is not None and saved_accum != acc.gradient_accumulation_steps:
        raise EngineError(
            f"checkpoint {path} was written accumulating gradients over {saved_accum} micro-batch(es) per step and "
            f"this run accumulates over {acc.gradient_accumulation_steps} (unset, `trainer.grad_accum` takes the "
            f"launcher's --gradient_accumulation_steps): resume with `trainer.grad_accum = {saved_accum}`, or start "
            "a new run with another --out"
        )
    if "model" not in parts:
        raise EngineError(
            f"checkpoint {path} holds no model, so it was not written by a training run: resume from one of a run's "
            "checkpoints"
        )
    try:
        acc.unwrap_model(engine.model).load_state_dict(parts["model"], strict=True)
    except RuntimeError as err:
        raise EngineError(f"the model in checkpoint {path} does not fit this model: {err}") from err
    if acc.scaler is not None and "scaler" in parts:
        with _part(path, "scaler"):
            acc.scaler.load_state_dict(parts["scaler"])
    elif acc.scaler is not None or "scaler" in parts:  # mixed precision changed to or from fp16 (allowed on resume)
        change = "starts fresh" if acc.scaler is not None else "is not used by this run"
        logger.info("checkpoint %s: the fp16 gradient scaler %s (mixed precision changed)", path, change)
    for name, target in (("optimizer", engine.optimizer), ("scheduler", engine.scheduler)):
        if (name in parts) != (target is not None):
            have = "holds" if name in parts else "has no"
            raise EngineError(
                f"checkpoint {path} {have} {name} state but this run {'has none' if target is None else 'has one'}"
            )
        if target is not None:
            with _part(path, name):
                target.load_state_dict(parts[name])
    saved_callbacks = dict(parts.get("callbacks", {}))
    for cb in engine.callbacks:
        if hasattr(cb, "load_state_dict"):
            if cb.key in saved_callbacks:
                with _part(path, f"callbacks.{cb.key}"):
                    cb.load_state_dict(saved_callbacks.pop(cb.key))
            else:
                logger.warning("checkpoint %s has no state for callback %s: it starts fresh", path, cb.key)
    for key in saved_callbacks:
        logger.warning("checkpoint %s holds state for callback %s, which this run does not have", path, key)
    with _part(path, "engine"):
        engine_state = dict(parts["engine"])
        acc.step = engine_state.pop("accumulation_counter")
        engine.state.load_state_dict(engine_state)
    with _part(path, "losses"):
        engine.loss_window.load_state_dict(parts["losses"], device=acc.device)
    with _part(path, "rng"):
        set_rng_state(parts["rng"]["now"])
        engine.epoch_start_rng = parts["rng"]["epoch_start"]
    logger.info("resumed from %s (epoch %d, step %d)", path, engine.state.epoch, engine.state.step)
    own = engine.out_dir is not None and path.parent.resolve() == (Path(engine.out_dir) / CHECKPOINT_DIR).resolve()
    if own and engine.is_main_process:
        abandoned = branch_from(path)
        if abandoned:
            logger.warning(
                "resumed from %s, older than the run's latest checkpoint: a re-run now continues from it, and %s "
                "(of the abandoned continuation) are replaced as this run reaches their steps",
                path.name,
                ", ".join(abandoned),
            )


@contextmanager
def _part(path: Path, part: str) -> Iterator[None]:
    """Name the checkpoint and its part when what it holds does not fit this run (a checksum-valid checkpoint can
    still come from another version of a callback or of the engine)."""
    try:
        yield
    except EngineError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as err:
        raise EngineError(
            f"checkpoint {path}: its `{part}` state does not fit this run ({type(err).__name__}: {err}); resume from "
            "another checkpoint (`--resume PATH`) or start a new run"
        ) from err


def load_weights(engine: Engine, source: str | Path) -> None:
    """Initialise the model from a checkpoint directory or a plain `.safetensors` file (fine-tuning)."""
    from safetensors.torch import load_file

    source = Path(source)
    if source.is_dir():
        resolved = resolve_checkpoint(source)
        weights = read_checkpoint(resolved, parts=["model"]).parts["model"]
    elif source.suffix == ".safetensors" and source.is_file():
        try:
            weights = load_file(source)
        except Exception as err:
            raise EngineError(f"cannot read weights file {source}: {err}") from err
    else:
        raise EngineError(f"`checkpoint.init_from` = {source}: expected a checkpoint directory or a .safetensors file")
    try:
        engine.accelerator.unwrap_model(engine.model).load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise EngineError(f"the weights in {source} do not fit this model: {err}") from err
    logger.info("initialised the model from %s", source)


# ---------------------------------------------------------------------------------------------- resume plans --
def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, a run directory or a `checkpoints/` root -> the checkpoint to use (verified)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        from accelengine.checkpoint import verify_checkpoint

        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            raise EngineError(str(err)) from err
        return path
    for root in (path / CHECKPOINT_DIR, path):
        if root.is_dir():
            latest = find_latest(root)
            if latest is not None:
                return latest
    raise EngineError(f"no complete checkpoint found at {path}")


def agree_on_resume(accelerator: Any, path: Path | None) -> Path | None:
    """The checkpoint every process continues from: rank 0's. Each process chose its own (`plan_resume` runs before
    the processes can talk), and a read error on one of them, or a checkpoint being written meanwhile, can make it
    choose another: processes resuming at different steps would wait for each other for ever."""
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    chosen = broadcast_object_list([None if path is None else str(path)])[0]
    chosen = None if chosen is None else Path(chosen)
    if chosen != path:
        logger.warning(
            "rank %d would have continued from %s; it continues from %s, as rank 0 does",
            accelerator.process_index,
            path or "the beginning",
            chosen or "the beginning",
        )
    return chosen


def plan_resume(out_dir: Path, resume: str) -> Path | None:
    """Which checkpoint a run continues from: `auto` (newest complete one in the run directory, if any),
    `never` (the directory must be new or empty) or a path."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EngineError(f"--out {out_dir} is a file, not a directory: choose a directory for the run")
    if resume == "never":
        if out_dir.exists() and any(out_dir.iterdir()):
            raise EngineError(
                f"{out_dir} is not empty and --resume never forbids writing into it: choose another --out, "
                "or resume it with --resume auto"
            )
        return None
    if resume != "auto":
        return resolve_checkpoint(resume)
    if not out_dir.exists():
        return None
    latest = find_latest(out_dir / CHECKPOINT_DIR)
    if latest is not None:
        return latest
    summary = out_dir / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text()).get("status")
        except (OSError, ValueError):
            status = None
        if status in ("completed", "stopped"):
            raise EngineError(
                f"{out_dir} holds a finished run without a checkpoint to continue from; starting again would "
                "overwrite it: choose another --out"
            )
    if any(out_dir.iterdir()):
        logger.warning("%s holds no complete checkpoint: the run starts from the beginning", out_dir)
    return None
