"""One epoch through the training loader: a HuggingFace `datasets` table (`set_format("torch")`) against the same
data in a `TensorDataset` (50,000 samples of 64 features, batch 64, shuffled), as the engine loads them
(`accelengine.data.make_loader`), and the `TensorDataset` through a plain `DataLoader` for reference.

    python -m pytest benchmarks/bench_data.py --benchmark-only

`data_throughput.py` prints the same comparison as samples per second, with the ratio.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from accelengine.data import make_loader

SAMPLES, FEATURES, BATCH = 50_000, 64, 64


@pytest.fixture(scope="module")
def data():
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(SAMPLES, FEATURES, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g)
    table = datasets.Dataset.from_dict({"input": x.numpy(), "label": y.numpy()})
    table.set_format("torch")
    return table, TensorDataset(x, y)


def _epoch(loader) -> int:
    n = 0
    for batch in loader:
        n += len(batch["label"] if isinstance(batch, dict) else batch[1])
    return n


@pytest.mark.parametrize("source", ["hf-table", "tensor-dataset", "tensor-dataset-plain-dataloader"])
@pytest.mark.benchmark(group="loader: one epoch of 50,000 samples")
def test_loader_epoch(benchmark, data, source):
    table, tensors = data
    if source == "hf-table":
        loader = make_loader(table, batch_size=BATCH, shuffle=True)  # built once: it reads the table into tensors
    elif source == "tensor-dataset":
        loader = make_loader(tensors, batch_size=BATCH, shuffle=True)
    else:
        loader = DataLoader(tensors, batch_size=BATCH, shuffle=True)
    assert benchmark.pedantic(_epoch, args=(loader,), rounds=5, warmup_rounds=1) == SAMPLES
