"""What resuming in the middle of an epoch costs: resuming at batch 0 against batch 100,000 of a map-style data set.

    python benchmarks/resume_skip.py [--batches 100000] [--rounds 5] [--json]

The data set is a `TensorDataset` of (batches + 1000) * 8 samples of 8 features (batch 8, shuffled), the model a
tiny MLP. Two checkpoints are written once, without training 100,000 steps: an engine is set up
(`Engine.setup()`), its loop position is set by hand (`state.step` and `state.batch_in_epoch` = 0 or 100,000,
`epoch_start_rng` = the random state, as at the start of an epoch), and its own `Checkpointer.save(engine)` writes
the checkpoint exactly as at the end of a real step. Model and optimizer state are the same in both, so only the
position differs.

Each figure is the median over rounds (alternated) of the time from calling `fit()` on a fresh
`Engine(..., resume_from=checkpoint, out_dir=new run directory)` to the end of its first step (`after_fit_step`):
restoring the checkpoint, starting the loader (skipping the batches already done), loading one batch and one
step. `construct_s` is the time to build the `Engine` itself, the same in both. The claim: skipping is by index
(no batch before the resume point is loaded), so resuming at batch 100,000 costs about what resuming at 0 does.
For scale, `load_n_batches_s` is what loading those batches would cost instead (one pass of the same loader
through them, measured once).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

BATCH = 8
FEATURES = 8


def make_dataset(batches: int) -> TensorDataset:
    """(batches + 1000) batches of samples: spare batches, so the resumed step is inside the epoch, not at its end."""
    g = torch.Generator().manual_seed(0)
    n = (batches + 1000) * BATCH
    return TensorDataset(torch.randn(n, FEATURES, generator=g), torch.randint(0, 2, (n,), generator=g))


def make_engine(
    dataset: TensorDataset,
    out_dir: Path | None,
    steps: int,
    resume_from: Path | None = None,
    callbacks: Iterable[Any] = (),
) -> Any:
    """The engine of this benchmark: a tiny MLP, SGD, batch 8, the default callbacks without console output."""
    from accelengine import DataConfig, Engine, LogConfig, TrainerConfig

    torch.manual_seed(0)
    return Engine(
        model=nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 2)),
        data={"train": dataset},
        loss=nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        callbacks=list(callbacks),
        config=TrainerConfig(steps=steps, log_every=1000, device="cpu"),
        data_config=DataConfig(batch_size=BATCH),
        log_config=LogConfig(progress=False, console=False, trackers=[], summary=False),
        out_dir=out_dir,
        resume_from=resume_from,
    )


def write_checkpoint(dataset: TensorDataset, out_dir: Path, batch: int) -> Path:
    """A checkpoint whose loop position is `batch` batches into epoch 0, written by the engine's own checkpointer."""
    from accelengine.callbacks.checkpointer import Checkpointer
    from accelengine.restart import rng_state

    engine = make_engine(dataset, out_dir, steps=batch + 1)
    engine.setup()
    checkpointer = next(cb for cb in engine.callbacks if isinstance(cb, Checkpointer))
    checkpointer.before_fit(engine)  # creates its CheckpointManager
    engine.epoch_start_rng = rng_state()  # what the loop records when an epoch starts
    engine.state.step = engine.state.batch_in_epoch = batch
    path = checkpointer.save(engine)
    assert path is not None
    return path


def time_to_first_step(dataset: TensorDataset, checkpoint: Path, batch: int, out_dir: Path) -> tuple[float, float]:
    """(seconds to construct the Engine, seconds from `fit()` to the end of the first resumed step)."""
    from accelengine import Callback

    class FirstStep(Callback):
        at = 0.0

        def after_fit_step(self, engine) -> None:
            if not self.at:
                self.at = time.perf_counter()
                assert engine.state.batch_in_epoch == batch + 1, engine.state.batch_in_epoch  # it did resume there

    first = FirstStep()
    start = time.perf_counter()
    engine = make_engine(dataset, out_dir, steps=batch + 1, resume_from=checkpoint, callbacks=[first])
    built = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        engine.fit()
    return built - start, first.at - built


def time_loading(dataset: TensorDataset, batches: int) -> float:
    """Seconds to load the first `batches` batches through the engine's loader (what skipping avoids)."""
    from accelengine.data import make_loader

    start = time.perf_counter()
    for i, _ in enumerate(make_loader(dataset, batch_size=BATCH, shuffle=True), 1):
        if i == batches:
            break
    return time.perf_counter() - start


def measure(batches: int = 100_000, rounds: int = 5) -> dict[str, Any]:
    torch.set_num_threads(1)
    logging.getLogger("accelengine").disabled = True
    dataset = make_dataset(batches)
    times: dict[str, list[float]] = {"construct_0_s": [], "construct_n_s": [], "resume_0_s": [], "resume_n_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        points = {"0": 0, "n": batches}
        checkpoints = {k: write_checkpoint(dataset, root / f"saved-{k}", b) for k, b in points.items()}
        for r in range(rounds):
            for k in ("0", "n") if r % 2 == 0 else ("n", "0"):  # alternated: drift hits both alike
                built, first = time_to_first_step(dataset, checkpoints[k], points[k], root / f"run-{k}-{r}")
                times[f"construct_{k}_s"].append(built)
                times[f"resume_{k}_s"].append(first)
    med = {k: statistics.median(v) for k, v in times.items()}
    loading = time_loading(dataset, batches)
    return {
        "batches": batches,
        "batch_size": BATCH,
        "samples": len(dataset),
        "rounds": rounds,
        "resume_at_0_s": round(med["resume_0_s"], 4),
        "resume_at_n_s": round(med["resume_n_s"], 4),
        "resume_n_minus_0_s": round(med["resume_n_s"] - med["resume_0_s"], 4),
        "resume_n_vs_0": round(med["resume_n_s"] / med["resume_0_s"], 3),
        "construct_s": round(statistics.median(times["construct_0_s"] + times["construct_n_s"]), 4),
        "load_n_batches_s": round(loading, 3),
        "each_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=100_000, help="the resume point, in batches into the epoch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    result = measure(args.batches, args.rounds)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
