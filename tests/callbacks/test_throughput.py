"""ThroughputMonitor: samples/s, steps/s, step time, data wait, MFU, in the training record and the summary."""

from __future__ import annotations

import time

import pytest
from torch.utils.data import Dataset

from accelengine.callbacks import ThroughputMonitor
from accelengine.callbacks.throughput import batch_size

from .helpers import Recorder, tiny_engine


def test_values_in_the_training_record():
    rec = Recorder()
    engine = tiny_engine(callbacks=[ThroughputMonitor(flops_per_sample=1e6, peak_flops=1e12), rec])
    summary = engine.fit()
    records = [r for r in rec.records if "perf/samples_per_s" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert r["perf/samples_per_s"] == pytest.approx(16 * r["perf/steps_per_s"], rel=1e-6)
        assert r["perf/step_time_s"] == pytest.approx(1 / r["perf/steps_per_s"], rel=1e-6)
        assert 0 <= r["perf/data_wait_frac"] <= 1
        assert r["perf/mfu"] == pytest.approx(1e6 * r["perf/samples_per_s"] / 1e12)
        assert "perf/peak_mem_gb" not in r  # the CPU has no accelerator memory counter
    assert summary["throughput"]["samples_per_s"] > 0


class Slow(Dataset):
    """Every sample takes 5 ms to load: the data loader is the bottleneck."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        time.sleep(0.005)
        return self.base[i]


def test_data_wait_is_measured():
    rec = Recorder()
    engine = tiny_engine(callbacks=[ThroughputMonitor(), rec], steps=2, batch_size=4)
    engine.loaders["train"] = Slow(engine.loaders["train"])
    engine.fit()
    (record,) = [r for r in rec.records if "perf/data_wait_frac" in r]
    assert record["perf/data_wait_frac"] > 0.5


def test_batch_size_of_common_shapes():
    import torch

    x = torch.zeros(5, 3)
    assert batch_size(x) == 5 and batch_size((x, x)) == 5 and batch_size({"input": x}) == 5 and batch_size(None) == 0
