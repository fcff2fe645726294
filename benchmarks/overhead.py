"""Per-step cost of the engine against a bare PyTorch loop and the same loop written by hand with Accelerate.

The three run the same workload (model, data, loader, optimizer) interleaved in one process, round after round, and
each figure is the median over rounds of the steady-state time per step (after warm-up):

    python benchmarks/overhead.py                  # the tiny MLP (64-32-10, batch 64, SGD, one thread)
    python benchmarks/overhead.py --hidden 2048    # compute-bound
    python benchmarks/overhead.py --quick --json   # one JSON line in under a minute
    python benchmarks/overhead.py --hidden 2048 --rounds 100 --processes 5   # rounds pooled from 5 fresh processes

`engine_us` is measured with the engine's default callbacks; `engine_bare_us` with none (the loop alone). Neither
contestant carries a per-step timer: the bare loops read the clock before and after their steps, the engine at two of
its log steps (a callback's `on_log`), so its steps run exactly as in a user's run. All three
use the same loader (`accelengine.data.make_loader`: a batch per read); `raw_plain_loader_us` is the bare loop with a
plain `DataLoader` (a sample per read, then collation), for reference. The engine's console output (progress line,
log lines) is discarded while it is timed. `*_paired` ratios are the median over rounds of each round's own ratio
(the contestants of a round run back to back, so drift in the machine's speed cancels out); on a shared machine
they are steadier than the ratio of the medians; `*_paired_ci95` is a bootstrap 95 % interval of that median.
`*_of_minimums` compare each contestant's fastest run. Every run
starts from a collected, trimmed heap (`fresh_heap`), so no contestant inherits another's fragmentation.

`raw_lean_us` is the bare loop making the engine's optimizer calls (`accelengine.stepping.lean_optimizer_calls`:
the optimizer's step function and gradients set to None, without torch's per-call profiler annotation and hook loop,
which a plain `optimizer.step()` and `zero_grad()` pay). The engine makes those calls, so it can be faster than the
bare loop; `engine_vs_raw_lean_paired` is the engine's own loop cost, everything else being equal.

`raw_again_vs_raw_paired` is a control: the bare loop timed twice per round, as two contestants. Its distance from
1.0 is what this machine's measurement cannot tell apart from a real difference (in one process: heap layouts and
memory placement that favour one contestant throughout); a ratio closer to 1.0 than that says nothing either way.
`--processes N` pools the rounds of N fresh processes, run one after the other, which averages that bias out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accelengine.data import make_loader
from accelengine.stepping import lean_optimizer_calls

LOG_EVERY = 50  # the engine's training log (one read-back of the losses) every 50 steps


def make_workload(hidden: int, batch: int, batches: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * batches, 64, generator=g)
    y = torch.randint(0, 10, (batch * batches,), generator=g)

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return TensorDataset(x, y), model


def time_raw(
    dataset, make_model, batch: int, steps: int, warmup: int, plain_loader: bool = False, lean: bool = False
) -> float:
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step, zero_grad = lean_optimizer_calls(opt) if lean else (opt.step, lambda: opt.zero_grad(set_to_none=True))
    if plain_loader:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True)
    else:
        loader = make_loader(dataset, batch_size=batch, shuffle=True)
    done, start = 0, 0.0
    while done < steps + warmup:
        for x, y in loader:
            if done == warmup:
                start = time.perf_counter()
            loss = loss_fn(model(x), y)
            loss.backward()
            step()
            zero_grad()
            done += 1
            if done == steps + warmup:
                break
    return (time.perf_counter() - start) / steps


def time_accelerate(dataset, make_model, batch: int, steps: int, warmup: int) -> float:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model, opt, loader = accelerator.prepare(model, opt, make_loader(dataset, batch_size=batch, shuffle=True))
    done, start = 0, 0.0
    while done < steps + warmup:
        for x, y in loader:
            if done == warmup:
                start = time.perf_counter()
            loss = loss_fn(model(x), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps + warmup:
                break
    return (time.perf_counter() - start) / steps


def time_engine(dataset, make_model, batch: int, steps: int, warmup: int, callbacks: bool = True) -> float:
    from accelengine import Callback, DataConfig, Engine, TrainerConfig

    class Clock(Callback):
        """Reads the time at log steps only (`on_log`), so timing adds nothing to the steps in between, as in the
        bare loop: the figure is the time from the first log step after the warm-up to the last one."""

        def __init__(self):
            super().__init__()
            self.marks: list[tuple[int, float]] = []

        def on_log(self, engine, record):
            if "train/loss" in record and engine.state.step >= warmup:
                self.marks.append((engine.state.step, time.perf_counter()))

    clock = Clock()
    start = -(-warmup // LOG_EVERY) * LOG_EVERY  # the first log step after the warm-up
    engine = Engine(
        model=make_model(),
        data={"train": dataset},
        loss=nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        callbacks=[clock],
        config=TrainerConfig(steps=start + -(-steps // LOG_EVERY) * LOG_EVERY, log_every=LOG_EVERY, device="cpu"),
        data_config=DataConfig(batch_size=batch),
    )
    if not callbacks:
        engine.callbacks = [clock]
    with contextlib.redirect_stdout(io.StringIO()):  # the progress and log lines are not part of the figure
        engine.fit()
    (first_step, first), (last_step, last) = clock.marks[0], clock.marks[-1]
    return (last - first) / (last_step - first_step)


def fresh_heap() -> None:
    """Start each contestant from the same heap: free what the last one left and give the C heap's free pages back
    (glibc `malloc_trim`). Otherwise a contestant inherits the previous one's fragmentation, and with megabyte-sized
    activations (hidden 2048) glibc may return and re-fault pages on every step of whoever runs next: thousands of
    page faults and up to 10 % slower steps, landing on a different contestant each round."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()


def median_interval(
    values: list[float], level: float = 0.95, resamples: int = 2000, group_size: int | None = None
) -> tuple[float, float]:
    """A bootstrap interval of the median of `values` (percentile method, fixed seed): how far the paired ratio
    could move between two measurements on this machine. One round's ratio scatters by several percent (the
    contestants of a round get different heap layouts, and the machine drifts), so a 1 % target needs many rounds
    before its verdict means anything; this says how many were enough.

    With `group_size`, `values` are consecutive groups of that many rounds (one per process) and the bootstrap is
    two-stage: groups are drawn, then rounds within each. Rounds of one process share its memory layout, so they
    are not independent draws of it; resampling them alone would give an interval too narrow."""
    draw = random.Random(0)
    if group_size:
        groups = [values[i : i + group_size] for i in range(0, len(values), group_size)]

        def resample() -> list[float]:
            return [v for group in draw.choices(groups, k=len(groups)) for v in draw.choices(group, k=len(group))]

    else:

        def resample() -> list[float]:
            return draw.choices(values, k=len(values))

    medians = sorted(statistics.median(resample()) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * resamples)], medians[min(resamples - 1, int((1 - tail) * resamples))]


def collect(
    hidden: int = 32, batch: int = 64, steps: int = 300, warmup: int = 50, rounds: int = 7, plain_loader: bool = True
) -> dict[str, list[float]]:
    """Seconds per step of each contestant, one entry per round, the contestants of a round run back to back."""
    torch.set_num_threads(1)
    import logging

    logging.getLogger("accelengine").disabled = True
    dataset, make_model = make_workload(hidden, batch, batches=64)
    contestants = {
        "raw_us": lambda: time_raw(dataset, make_model, batch, steps, warmup),
        "raw_again_us": lambda: time_raw(dataset, make_model, batch, steps, warmup),  # the control
        "raw_lean_us": lambda: time_raw(dataset, make_model, batch, steps, warmup, lean=True),
        "accelerate_us": lambda: time_accelerate(dataset, make_model, batch, steps, warmup),
        "engine_us": lambda: time_engine(dataset, make_model, batch, steps, warmup),
        "engine_bare_us": lambda: time_engine(dataset, make_model, batch, steps, warmup, callbacks=False),
    }
    if plain_loader:  # a reference only: leave it out to spend the time on more rounds of the others
        contestants["raw_plain_loader_us"] = lambda: time_raw(dataset, make_model, batch, steps, warmup, True)
    runs: dict[str, list[float]] = {name: [] for name in contestants}
    names = list(contestants)
    for r in range(rounds):
        # rotate who goes first: what ran just before (allocator, caches) must not favour anyone
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fresh_heap()
            runs[name].append(contestants[name]())
    return runs


def collect_in_processes(
    script: str, processes: int, rounds: int, args: list[str], layout_seeds: bool = False
) -> dict[str, list[float]]:
    """A benchmark script's `collect` (its `--runs-only` output: per-round figures of each contestant) in `processes`
    fresh processes, one after the other, `rounds / processes` rounds each, pooled.

    Within one process a contestant keeps the same heap layout and memory placement throughout, which favours one of
    them by up to about 1 % for the whole run (the control shows it); a fresh process draws them anew, so pooling
    several processes averages that bias out instead of reporting one draw of it. Where a process's allocations
    repeat the same sequence, it draws the same layout every time; with `layout_seeds` each child gets
    `--layout-seed K` (K = 0, 1, ...) to vary it (see `data_throughput.py`)."""
    runs: dict[str, list[float]] = {}
    per_process = -(-rounds // processes)
    for k in range(processes):
        seed = ["--layout-seed", str(k)] if layout_seeds else []
        command = [sys.executable, script, *args, *seed, "--rounds", str(per_process), "--runs-only"]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        for name, values in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            runs.setdefault(name, []).extend(values)  # in round order: the pairs of a round stay aligned
    return runs


def summarize(runs: dict[str, list[float]]) -> dict[str, Any]:
    """Median time per step of each contestant (as microseconds) and the ratios; see the module docstring."""
    result: dict[str, Any] = {k: round(statistics.median(v) * 1e6, 1) for k, v in runs.items()}
    result["engine_vs_raw"] = round(result["engine_us"] / result["raw_us"], 3)
    result["engine_bare_vs_raw"] = round(result["engine_bare_us"] / result["raw_us"], 3)
    result["accelerate_vs_raw"] = round(result["accelerate_us"] / result["raw_us"], 3)
    result["engine_vs_accelerate"] = round(result["engine_us"] / result["accelerate_us"], 3)
    result["raw_again_vs_raw"] = round(result["raw_again_us"] / result["raw_us"], 3)
    result["engine_vs_raw_lean"] = round(result["engine_us"] / result["raw_lean_us"], 3)
    pairs = [("engine", "raw"), ("engine_bare", "raw"), ("engine", "accelerate"), ("raw_again", "raw")]
    pairs += [("engine", "raw_lean"), ("engine_bare", "raw_lean")]
    for name, over in pairs:
        ratios = [a / b for a, b in zip(runs[f"{name}_us"], runs[f"{over}_us"], strict=True)]
        result[f"{name}_vs_{over}_paired"] = round(statistics.median(ratios), 3)
        result[f"{name}_vs_{over}_paired_ci95"] = [round(bound, 3) for bound in median_interval(ratios)]
        # the least disturbed run of each: on a shared machine, noise only ever adds time
        result[f"{name}_vs_{over}_of_minimums"] = round(min(runs[f"{name}_us"]) / min(runs[f"{over}_us"]), 3)
    return result


def measure(
    hidden: int = 32,
    batch: int = 64,
    steps: int = 300,
    warmup: int = 50,
    rounds: int = 7,
    plain_loader: bool = True,
    processes: int = 1,
) -> dict[str, Any]:
    """`summarize` of `collect`, in this process or pooled from `processes` fresh ones (`collect_in_processes`)."""
    if processes > 1:
        args = ["--hidden", str(hidden), "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup)]
        args += [] if plain_loader else ["--no-plain-loader"]
        runs = collect_in_processes(str(Path(__file__).resolve()), processes, rounds, args)
    else:
        runs = collect(hidden, batch, steps, warmup, rounds, plain_loader)
    result = summarize(runs)
    result.update(
        hidden=hidden,
        batch=batch,
        steps=steps,
        warmup=warmup,
        rounds=len(runs["raw_us"]),
        processes=processes,
        threads=1,
        log_every=LOG_EVERY,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=50, help="steps before the clock starts, in every run")
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (200 and 10): under a minute")
    ap.add_argument("--no-plain-loader", action="store_true", help="leave out the reference `raw_plain_loader_us`")
    ap.add_argument("--processes", type=int, default=1, help="pool the rounds of this many fresh processes")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--runs-only", action="store_true", help=argparse.SUPPRESS)  # a child of `--processes`
    args = ap.parse_args()
    steps, rounds = (200, 10) if args.quick else (args.steps, args.rounds)
    plain_loader = not args.no_plain_loader
    if args.runs_only:
        print(json.dumps(collect(args.hidden, args.batch, steps, args.warmup, rounds, plain_loader)))
        return
    result = measure(
        args.hidden, args.batch, steps, args.warmup, rounds, plain_loader=plain_loader, processes=args.processes
    )
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>26}: {v}")


if __name__ == "__main__":
    main()
