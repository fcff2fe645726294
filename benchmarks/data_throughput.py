"""Samples per second through the training loader: a HuggingFace `datasets` table (`set_format("torch")`) against
the same data in a torch `TensorDataset`, both as the engine loads them (`accelengine.data.make_loader`: a batch per
read, shuffled), and, for reference, the `TensorDataset` through a plain `DataLoader` (a sample per read, then
collation). Three epochs per measurement; the three loaders alternate round by round and each figure is the median.

    python benchmarks/data_throughput.py [--samples 50000] [--rounds 9] [--processes 1] [--json]

`hf_vs_tensor_dataset` is the target's ratio (at least 1.0: the table at least as fast as the `TensorDataset`);
`hf_vs_tensor_dataset_paired` is the median of each round's own ratio (steadier on a shared machine), and
`hf_vs_tensor_dataset_paired_ci95` a bootstrap 95 % interval of it. `tensor_dataset_again_vs_tensor_dataset_paired`
is a control: a second `TensorDataset` loader built the same way, whose distance from 1.0 is what the measurement
cannot resolve.

Where a table's memory lies moves its rate by up to about 1.5 % for a whole process, and a fresh process that
repeats the same allocations draws the same placement again: with the tensors built in one fixed order, the copy
made later read 1.2 % faster than the first in 5 processes of 5. So each data set is built from its own copy of the
data, and with `--layout-seed K` (given to every child of `--processes`, K = 0, 1, ...) the order of the builds and
a random gap before each are drawn from K: the processes sample placements, and the pooled ratio (with its
two-stage interval, processes then rounds) compares the loaders rather than one placement.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from overhead import collect_in_processes, median_interval
from torch.utils.data import DataLoader, TensorDataset

from accelengine.data import make_loader


def epoch_rate(loader: DataLoader, epochs: int = 3) -> float:
    """Samples per second over `epochs` passes of `loader`."""
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            n += len(batch["label"] if isinstance(batch, dict) else batch[1])
    return n / (time.perf_counter() - start)


def collect(
    samples: int = 50_000, features: int = 64, batch: int = 64, rounds: int = 9, layout_seed: int | None = None
) -> dict[str, list[float]]:
    """Samples per second of each loader, one entry per round, the loaders of a round run back to back; see the
    module docstring for `layout_seed`."""
    import datasets

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(samples, features, generator=g), torch.randint(0, 10, (samples,), generator=g)
    table = datasets.Dataset.from_dict({"input": x.numpy(), "label": y.numpy()})
    table.set_format("torch")
    builds = {  # each reads its own copy: the table's columns are copied out of Arrow when its loader is made
        "hf_table": lambda: make_loader(table, batch_size=batch, shuffle=True),
        "tensor_dataset": lambda: make_loader(TensorDataset(x.clone(), y.clone()), batch_size=batch, shuffle=True),
        "tensor_dataset_again": lambda: make_loader(
            TensorDataset(x.clone(), y.clone()), batch_size=batch, shuffle=True
        ),
    }
    order, gaps = list(builds), []
    if layout_seed is not None:
        draw = random.Random(layout_seed)
        draw.shuffle(order)
    loaders: dict[str, DataLoader] = {}
    for name in order:
        if layout_seed is not None:  # kept alive to the end: it shifts where the next build's memory lies
            gaps.append(torch.empty(draw.randrange(64, 4 << 20, 64), dtype=torch.uint8))
        loaders[name] = builds[name]()
    loaders = {name: loaders[name] for name in builds}  # the rotation below starts from the same order everywhere
    plain = TensorDataset(*loaders["tensor_dataset"].dataset.tensors)
    loaders["tensor_dataset_plain_loader"] = DataLoader(plain, batch_size=batch, shuffle=True)
    for loader in loaders.values():  # warm-up: first-epoch allocations and lazy imports
        epoch_rate(loader, epochs=1)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    names = list(loaders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            rates[name].append(epoch_rate(loaders[name]))
    return rates


def measure(
    samples: int = 50_000, features: int = 64, batch: int = 64, rounds: int = 9, processes: int = 1
) -> dict[str, Any]:
    """The loaders' median rates and ratios, from this process or pooled from `processes` fresh ones."""
    if processes > 1:
        args = ["--samples", str(samples), "--features", str(features), "--batch", str(batch)]
        rates = collect_in_processes(str(Path(__file__).resolve()), processes, rounds, args, layout_seeds=True)
        group_size = len(rates["hf_table"]) // processes
    else:
        group_size = None
        rates = collect(samples, features, batch, rounds)
    result: dict[str, Any] = {f"{k}_samples_per_s": round(statistics.median(v)) for k, v in rates.items()}
    hf, td = result["hf_table_samples_per_s"], result["tensor_dataset_samples_per_s"]
    result["hf_vs_tensor_dataset"] = round(hf / td, 3)
    # (the figure's name, the loader, the one it is compared with)
    pairs = (("hf", "hf_table", "tensor_dataset"), ("tensor_dataset_again", "tensor_dataset_again", "tensor_dataset"))
    for label, name, over in pairs:
        paired = [a / b for a, b in zip(rates[name], rates[over], strict=True)]
        result[f"{label}_vs_{over}_paired"] = round(statistics.median(paired), 3)
        result[f"{label}_vs_{over}_paired_ci95"] = [
            round(bound, 3) for bound in median_interval(paired, group_size=group_size)
        ]
    result["hf_vs_plain_loader"] = round(hf / result["tensor_dataset_plain_loader_samples_per_s"], 3)
    result.update(samples=samples, features=features, batch=batch, rounds=len(rates["hf_table"]), processes=processes)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--processes", type=int, default=1, help="pool the rounds of this many fresh processes")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--layout-seed", type=int, default=None, help="vary where the data sets' memory lies")
    ap.add_argument("--runs-only", action="store_true", help=argparse.SUPPRESS)  # a child of `--processes`
    args = ap.parse_args()
    if args.runs_only:
        print(json.dumps(collect(args.samples, args.features, args.batch, args.rounds, args.layout_seed)))
        return
    res = measure(args.samples, args.features, args.batch, args.rounds, processes=args.processes)
    print(json.dumps(res) if args.json else "\n".join(f"{k:>42}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
