"""Samples per second through the training loader: a HuggingFace `datasets` table (`set_format("torch")`) against
the same data in a torch `TensorDataset`, both as the engine loads them (a batch per read) and, for reference, the
`TensorDataset` through a plain `DataLoader` (a sample per read, then collation).

    python benchmarks/data_throughput.py [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from accelengine.data import make_loader


def samples_per_s(loader: DataLoader, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        start, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["label"] if isinstance(batch, dict) else batch[1])
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def measure(samples: int = 50_000, features: int = 64, batch: int = 64, rounds: int = 5) -> dict:
    import datasets

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(samples, features, generator=g), torch.randint(0, 10, (samples,), generator=g)
    tensors = TensorDataset(x, y)
    table = datasets.Dataset.from_dict({"input": x.numpy(), "label": y.numpy()})
    table.set_format("torch")
    result = {
        "hf_table_samples_per_s": samples_per_s(make_loader(table, batch_size=batch, shuffle=True), rounds),
        "tensor_dataset_samples_per_s": samples_per_s(make_loader(tensors, batch_size=batch, shuffle=True), rounds),
        "tensor_dataset_plain_loader_samples_per_s": samples_per_s(
            DataLoader(tensors, batch_size=batch, shuffle=True), rounds
        ),
    }
    result = {k: round(v) for k, v in result.items()}
    result["hf_vs_tensor_dataset"] = round(result["hf_table_samples_per_s"] / result["tensor_dataset_samples_per_s"], 3)
    result["hf_vs_plain_loader"] = round(
        result["hf_table_samples_per_s"] / result["tensor_dataset_plain_loader_samples_per_s"], 3
    )
    result.update(samples=samples, features=features, batch=batch)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    res = measure()
    print(json.dumps(res) if ap.parse_args().json else "\n".join(f"{k:>42}: {v}" for k, v in res.items()))
