"""Per-step cost of the default callback set against none, as JSON (median and best of N alternated runs).

    python benchmarks/callback_overhead.py [--steps 2000] [--runs 5] [--log-every 10] [--out-dir]

A tiny MLP (32 -> 64 -> 4) on synthetic data, batch 32, SGD, on the CPU: a step of a few hundred microseconds, so
any per-step cost of the callbacks shows. `defaults` is `Engine(...)` as constructed (progress bar in plain-line
mode, console, metrics.jsonl, parameter table, NaN guard in stop mode, summary; TensorBoard too with `--out-dir`);
`none` is the same engine with its `callbacks` list emptied after construction. Both log every `--log-every`
steps (default 10, the trainer's default) and evaluate once, at the end. The time is the training loop (from the
first epoch's start to the end of the final evaluation), divided by the steps.

On a shared machine the loop times drift by a few percent between runs, so the time spent inside the callbacks'
handlers is also measured directly (`in_callbacks_us_per_step`: every dispatched handler timed, training loop only).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time

import torch

from accelengine import MLP, DataConfig, Engine, LogConfig, TrainerConfig
from accelengine.callbacks.base import HOOKS, overrides
from accelengine.examples.synthetic import classification


class Timed(Engine):
    """Times the training loop: from the first epoch's start to `after_task` (the end-of-run work after it, such as
    the final checkpoint, summary and tracker shutdown, is paid once per run, not per step)."""

    in_callbacks = 0.0
    timing = False

    def before_fit_epoch(self) -> None:
        if self.state.epoch == 0:
            self.loop_start = time.perf_counter()
            self.in_callbacks = 0.0
            self.timing = True

    def after_task(self) -> None:
        self.loop_end = time.perf_counter()
        self.timing = False

    def time_handlers(self) -> None:
        """Wrap every callback's hook methods with a clock (call before `setup`, which binds them)."""

        def timed(fn):
            def run(*args):
                t = time.perf_counter()
                fn(*args)
                if self.timing:
                    self.in_callbacks += time.perf_counter() - t

            return run

        for cb in self.callbacks:
            for hook in (*HOOKS, "on_log"):
                if hook == "on_log" or overrides(cb, hook):
                    setattr(cb, hook, timed(getattr(cb, hook)))


def once(
    steps: int, builtins: bool, out_dir: str | None, hooks: list[float] | None = None, log_every: int = 10
) -> float:
    torch.manual_seed(0)
    engine = Timed(
        model=MLP(32, 4, hidden=[64]),
        data={"train": classification(samples=4096, features=32), "val": classification(256, features=32, seed=1)},
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        config=TrainerConfig(steps=steps, log_every=log_every, eval_every=10**9, device="cpu"),
        data_config=DataConfig(batch_size=32),
        log_config=LogConfig(),
        out_dir=out_dir,
    )
    if not builtins:
        engine.callbacks = []
    if hooks is not None:
        engine.time_handlers()
    with contextlib.redirect_stdout(io.StringIO()):
        engine.fit()
    if hooks is not None:
        hooks.append(engine.in_callbacks / steps)
    return (engine.loop_end - engine.loop_start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--log-every", type=int, default=10, help="trainer.log_every (default: the trainer's, 10)")
    ap.add_argument("--out-dir", action="store_true", help="give a run directory (files, TensorBoard)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"defaults": [], "none": []}
    with tempfile.TemporaryDirectory() as tmp:
        once(200, True, None)  # warm-up: first-call imports and allocations
        for i in range(args.runs):  # alternated, so drift affects both sides alike
            for name in ("defaults", "none"):
                out = f"{tmp}/{name}-{i}" if args.out_dir else None
                times[name].append(once(args.steps, name == "defaults", out, log_every=args.log_every))
    hooks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            once(args.steps, True, f"{tmp}/{i}" if args.out_dir else None, hooks, log_every=args.log_every)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # the least disturbed run: robust on a busy machine
    print(
        json.dumps(
            {
                "steps": args.steps,
                "runs": args.runs,
                "out_dir": args.out_dir,
                "log_every": args.log_every,
                "us_per_step": {k: round(v * 1e6, 1) for k, v in med.items()},
                "overhead_pct": round(100 * (med["defaults"] / med["none"] - 1), 2),
                "best_us_per_step": {k: round(v * 1e6, 1) for k, v in best.items()},
                "best_overhead_pct": round(100 * (best["defaults"] / best["none"] - 1), 2),
                # each run against the one next to it: drift on a shared machine cancels out
                "paired_overhead_pct": round(
                    100 * (statistics.median(d / n for d, n in zip(times["defaults"], times["none"], strict=True)) - 1),
                    2,
                ),
                "in_callbacks_us_per_step": round(statistics.median(hooks) * 1e6, 2),
                "in_callbacks_pct_of_step": round(100 * statistics.median(hooks) / med["none"], 2),
                "all_us_per_step": {k: [round(x * 1e6, 1) for x in v] for k, v in times.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
