"""Per-step cost of the engine against a bare PyTorch loop and the same loop written by hand with Accelerate.

The three run the same workload (model, data, loader, optimizer) interleaved in one process, round after round, and
each figure is the median over rounds of the steady-state time per step (after warm-up):

    python benchmarks/overhead.py                  # the tiny MLP (64-32-10, batch 64, SGD, one thread)
    python benchmarks/overhead.py --hidden 2048    # compute-bound
    python benchmarks/overhead.py --quick --json   # one JSON line in under a minute

`engine_us` is measured with the engine's default callbacks; `engine_bare_us` with none (the loop alone). All three
use the same loader (`accelengine.data.make_loader`: a batch per read); `raw_plain_loader_us` is the bare loop with a
plain `DataLoader` (a sample per read, then collation), for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accelengine.data import make_loader


def make_workload(hidden: int, batch: int, batches: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch * batches, 64, generator=g)
    y = torch.randint(0, 10, (batch * batches,), generator=g)

    def model():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    return TensorDataset(x, y), model


def time_raw(dataset, make_model, batch: int, steps: int, warmup: int, plain_loader: bool = False) -> float:
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
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
            opt.step()
            opt.zero_grad(set_to_none=True)
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
        def __init__(self):
            super().__init__()
            self.start = self.end = 0.0

        def after_fit_step(self, engine):
            if engine.state.step == warmup:
                self.start = time.perf_counter()
            elif engine.state.step == warmup + steps:
                self.end = time.perf_counter()

    clock = Clock()
    engine = Engine(
        model=make_model(),
        data={"train": dataset},
        loss=nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        callbacks=[clock],
        config=TrainerConfig(steps=steps + warmup, log_every=50, device="cpu"),
        data_config=DataConfig(batch_size=batch),
    )
    if not callbacks:
        engine.callbacks = [clock]
    engine.fit()
    return (clock.end - clock.start) / steps


def measure(hidden: int = 32, batch: int = 64, steps: int = 300, warmup: int = 50, rounds: int = 7) -> dict:
    torch.set_num_threads(1)
    import logging

    logging.getLogger("accelengine").disabled = True
    dataset, make_model = make_workload(hidden, batch, batches=64)
    contestants = {
        "raw_us": lambda: time_raw(dataset, make_model, batch, steps, warmup),
        "accelerate_us": lambda: time_accelerate(dataset, make_model, batch, steps, warmup),
        "engine_us": lambda: time_engine(dataset, make_model, batch, steps, warmup),
        "engine_bare_us": lambda: time_engine(dataset, make_model, batch, steps, warmup, callbacks=False),
        "raw_plain_loader_us": lambda: time_raw(dataset, make_model, batch, steps, warmup, plain_loader=True),
    }
    runs: dict[str, list[float]] = {name: [] for name in contestants}
    names = list(contestants)
    for r in range(rounds):
        # rotate who goes first: what ran just before (allocator, caches) must not favour anyone
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(contestants[name]())
    result = {k: round(statistics.median(v) * 1e6, 1) for k, v in runs.items()}
    result["engine_vs_raw"] = round(result["engine_us"] / result["raw_us"], 3)
    result["engine_bare_vs_raw"] = round(result["engine_bare_us"] / result["raw_us"], 3)
    result["accelerate_vs_raw"] = round(result["accelerate_us"] / result["raw_us"], 3)
    result.update(hidden=hidden, batch=batch, steps=steps, rounds=rounds, threads=1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds: under a minute")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    steps, rounds = (200, 10) if args.quick else (args.steps, args.rounds)
    result = measure(args.hidden, args.batch, steps=steps, rounds=rounds)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")


if __name__ == "__main__":
    main()
