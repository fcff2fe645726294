"""Checkpoint save/load of ~300 MB (a 25M-parameter model plus its AdamW state) against plain safetensors.

    python -m pytest benchmarks/bench_checkpoint.py --benchmark-only --benchmark-group-by=group

The same comparisons as `checkpoint_figures.py` (which prints the ratios; see its docstring for why each baseline
is what it is). Saves end with an fsync of every file; the plain save writes into a new directory each round, as
a checkpoint must (the previous one is deleted outside the timed region, ours by its background rotation, waited
for outside the timing). Loads read from a warm page cache: plain `load_file` memory-maps lazily and reads nothing,
so the fair baselines read the data: `backend="pread"` (into owned memory, as `read_checkpoint` does) and
`touched` (every byte read once through the mapping).
"""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch
from checkpoint_figures import PREAD, flat_optimizer_tensors, load_plain, make_state, save_plain

from accelengine.checkpoint import CheckpointManager, find_latest, read_checkpoint

ROUNDS = 5


@pytest.fixture(scope="module")
def state():
    """~25M float32 parameters and their AdamW state after one step (~300 MB)."""
    model_sd, opt_sd = make_state(25_000_000)
    return model_sd, opt_sd, flat_optimizer_tensors(opt_sd)


@pytest.fixture(scope="module")
def saved(state, tmp_path_factory):
    """One checkpoint of ours and one plain copy of the same tensors, for the loads."""
    model_sd, opt_sd, opt_flat = state
    root = tmp_path_factory.mktemp("saved")
    ours = CheckpointManager(root / "ours").save("step-00000001", shared={"model": model_sd, "optimizer": opt_sd})
    save_plain(root / "plain", model_sd, opt_flat)
    return ours, root / "plain"


@pytest.mark.benchmark(group="save")
def test_save_accelengine(benchmark, state, tmp_path):
    model_sd, opt_sd, _ = state
    mgr = CheckpointManager(tmp_path, keep_last=1)
    steps = itertools.count()

    def save():
        step = next(steps)
        mgr.save(f"step-{step:08d}", shared={"model": model_sd, "optimizer": opt_sd}, meta={"step": step})

    benchmark.pedantic(save, teardown=mgr.wait, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="save")
def test_save_plain_safetensors_fsync(benchmark, state, tmp_path):
    model_sd, _, opt_flat = state
    made: list = []

    def setup():
        if made:
            shutil.rmtree(made[-1])  # the previous checkpoint, deleted outside the timing
        made.append(tmp_path / f"step-{len(made):08d}")
        return (made[-1], model_sd, opt_flat), {}

    benchmark.pedantic(save_plain, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="load")
def test_load_accelengine(benchmark, state, saved):
    ckpt = benchmark.pedantic(read_checkpoint, args=(saved[0],), rounds=ROUNDS, warmup_rounds=1)
    assert torch.equal(ckpt.parts["model"]["0.weight"], state[0]["0.weight"])


@pytest.mark.benchmark(group="load")
def test_resume_accelengine_find_latest_then_read(benchmark, saved):
    """What a resume does: `find_latest` verifies the newest checkpoint, then `read_checkpoint` reads it."""
    benchmark.pedantic(lambda: read_checkpoint(find_latest(saved[0].parent)), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("how", ["lazy-mmap", "touched", "pread"])
@pytest.mark.benchmark(group="load")
def test_load_plain_safetensors(benchmark, state, saved, how):
    if how == "pread" and not PREAD:
        pytest.skip("this safetensors has no load backends")
    kw = {"touch": True} if how == "touched" else PREAD if how == "pread" else {}
    loaded = benchmark.pedantic(load_plain, args=(saved[1],), kwargs=kw, rounds=ROUNDS, warmup_rounds=1)
    assert torch.equal(loaded[0]["0.weight"], state[0]["0.weight"])
