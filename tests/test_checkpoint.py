"""Checkpoint storage: exact round trips, verification, crash safety, rotation, two real processes."""

from __future__ import annotations

import datetime
import errno
import logging
import os
import pickle
import random
import re
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from accelengine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    find_latest,
    format_inspection,
    inspect_checkpoint,
    list_checkpoints,
    read_checkpoint,
    verify_checkpoint,
)


def assert_same(a, b, path="<root>"):
    """Equal values *and* equal types, all the way down; floats and tensors compared bit for bit."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), (
            f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        )
        if a.numel():
            bits = lambda t: t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
            assert torch.equal(bits(a), bits(b)), f"{path}: tensor values differ"
    elif isinstance(a, np.ndarray | np.generic):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: array values differ"
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), f"{path}._metadata")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def trained(opt_factory, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = opt_factory(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def train_more(model, opt, sched, steps=3):
    torch.manual_seed(123)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def save_one(root, name="step-00000001", step=1, metric=None, **kw):
    mgr = kw.pop("mgr", None) or CheckpointManager(root, **kw)
    shared = {"model": {"w": torch.full((4,), float(step))}, "engine": {"step": step}}
    return mgr.save(name, shared=shared, meta={"step": step}, metric=metric)


@pytest.mark.parametrize(
    "opt_factory",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_optimizer_and_scheduler_round_trip_and_resume_identically(tmp_path, opt_factory):
    model, opt, sched = trained(opt_factory)
    states = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    path = CheckpointManager(tmp_path).save("step-00000003", shared=states, meta={"step": 3})

    ckpt = read_checkpoint(path)
    for name, state in states.items():
        assert_same(state, ckpt.parts[name], name)
    assert ckpt.meta == {"step": 3}

    # Restoring into fresh objects and training on gives exactly the same weights as training on the originals.
    model2, opt2, sched2 = trained(opt_factory, steps=0)
    model2.load_state_dict(ckpt.parts["model"])
    opt2.load_state_dict(ckpt.parts["optimizer"])
    sched2.load_state_dict(ckpt.parts["scheduler"])
    for p, q in zip(train_more(model, opt, sched), train_more(model2, opt2, sched2), strict=True):
        assert torch.equal(p, q)


def test_rng_states_round_trip_and_reproduce_the_next_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    draws = (random.random(), np.random.rand(3), torch.rand(3))
    path = CheckpointManager(tmp_path).save("step-00000001", per_rank={"rng": rng})

    got = read_checkpoint(path).parts["rng"]
    assert_same(rng, got)
    random.setstate(got["python"])
    np.random.set_state(got["numpy"])
    torch.set_rng_state(got["torch"])
    assert random.random() == draws[0]
    assert np.array_equal(np.random.rand(3), draws[1])
    assert torch.equal(torch.rand(3), draws[2])


def test_exotic_structures_round_trip_exactly(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tree = {
        "ints": {0: "zero", 1: [1, 2, 3], -5: None, 2**70: True},
        "tuple_keys": {(1, "a"): 1.5, (): "empty", None: "none", 2.5: "float", False: "bool"},
        "tuple_vs_list": ([1, (2, 3)], (4, [5])),
        "floats": [float("inf"), float("-inf"), float("nan"), -0.0, 0.1, 1e308, 5e-324, 2.0],
        "nan_payload": struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_DEAD_BEEF))[0],
        "scalars": [True, False, None, "", "ünïcødé ✓", 2**100, -(2**64)],
        "bytes": b"\x00\x01\xff",
        "tag_lookalike": {"$t": "tuple", "v": [1]},
        "ordered": OrderedDict([("b", 1), ("a", 2)]),
        "ordered_int_keys": OrderedDict([(2, "x"), (1, "y")]),
        "dtypes": {str(d): torch.arange(6).to(d).reshape(2, 3) for d in (torch.bool, torch.uint8, torch.int8)}
        | {str(d): torch.randn(2, 3).to(d) for d in (torch.float16, torch.bfloat16, torch.float64, torch.complex64)}
        | {"uint32": torch.tensor([0, 2**32 - 1], dtype=torch.uint32), "f8": torch.randn(4).to(torch.float8_e4m3fn)},
        "zero_dim": torch.tensor(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "shared": [base, base[2:5], base.view(3, 4)],  # one storage, three tensors
        "overlapping": (base[0:8], base[4:12]),
        "transposed": torch.randn(3, 4).t(),
        "strided": torch.randn(10)[::3],
        "numpy": {
            "f32": np.linspace(0, 1, 5, dtype=np.float32),
            "u32": np.arange(4, dtype=np.uint32),
            "bool": np.array([[True, False]]),
            "zero_dim": np.array(3.5),
            "big_endian": np.arange(3, dtype=">i4"),
            "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
            "empty": np.zeros((0, 2), dtype=np.int16),
        },
        "numpy_scalars": [np.float64(1.25), np.int32(-3), np.bool_(True), np.float32("nan")],
        "collide": {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}, "__metadata__": torch.ones(2)},
    }
    tree["grad"] = torch.nn.Parameter(torch.randn(2))
    path = CheckpointManager(tmp_path).save("x", shared={"tree": tree})
    got = read_checkpoint(path).parts["tree"]
    expected = dict(tree, grad=tree["grad"].detach())  # Parameters come back as plain tensors
    assert_same(expected, got)
    assert got["tag_lookalike"] == {"$t": "tuple", "v": [1]}


def test_unsigned_numpy_arrays_survive_a_torch_without_unsigned_dtypes(tmp_path, monkeypatch):
    import accelengine.checkpoint as checkpoint

    monkeypatch.setitem(checkpoint._NP_TO_TORCH, "uint32", torch.int32)  # as on torch < 2.3
    state = {"numpy": np.random.RandomState(5).get_state(), "u": np.array([0, 2**32 - 1], dtype=">u4")}
    path = CheckpointManager(tmp_path).save("x", per_rank={"rng": state})
    assert_same(state, read_checkpoint(path).parts["rng"])


def test_model_part_is_a_plain_weights_file_and_only_json_and_safetensors_are_written(tmp_path):
    model, opt, _ = trained(lambda p: torch.optim.AdamW(p, lr=1e-3))
    path = CheckpointManager(tmp_path).save(
        "step-00000003", shared={"model": model.state_dict(), "optimizer": opt.state_dict()}, per_rank={"rng": {}}
    )
    weights = load_file(path / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(weights[k], v)
    assert {p.suffix for p in path.iterdir()} == {".json", ".safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000003"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"


@pytest.mark.parametrize(
    ("value", "where"),
    [(lambda: 1, "inner.1"), (object(), "inner.1"), ({1, 2}, "inner.1"), (torch.randn(2).to_sparse(), "inner.1")],
    ids=["lambda", "object", "set", "sparse"],
)
def test_unsupported_values_name_the_part_and_key_path(tmp_path, value, where):
    with pytest.raises(CheckpointError, match=rf"part 'engine' at key path '{where}'"):
        CheckpointManager(tmp_path).save("x", shared={"engine": {"inner": [0, value]}})
    assert find_latest(tmp_path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_meta_must_be_plain_values(tmp_path):
    with pytest.raises(CheckpointError, match="meta"):
        CheckpointManager(tmp_path).save("x", shared={}, meta={"loss": torch.tensor(1.0)})


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-3])


def _flip(p):
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip, Path.unlink], ids=["truncated", "altered", "deleted"])
@pytest.mark.parametrize("victim", ["model.safetensors", "model.json", "engine.json"])
def test_damaged_files_are_detected_and_named(tmp_path, damage, victim):
    path = save_one(tmp_path)
    damage(path / victim)
    name, ckpt = re.escape(victim), re.escape(path.name)
    with pytest.raises(CheckpointError, match=rf"{name}.*{ckpt}|{ckpt}.*{name}"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=name):
        verify_checkpoint(path)
    assert find_latest(tmp_path) is None


def test_reading_some_parts_still_size_checks_the_others(tmp_path):
    path = save_one(tmp_path)
    assert set(read_checkpoint(path, parts=["engine"]).parts) == {"engine"}
    with pytest.raises(CheckpointError, match="no part"):
        read_checkpoint(path, parts=["nope"])
    _truncate(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        read_checkpoint(path, parts=["engine"])


def test_find_latest_falls_back_when_the_newest_is_damaged(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path)
    first = save_one(tmp_path, "step-00000001", step=1, mgr=mgr)
    second = save_one(tmp_path, "step-00000002", step=2, mgr=mgr)
    assert find_latest(tmp_path) == second
    _flip(second / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="accelengine.checkpoint"):
        assert find_latest(tmp_path) == first
    assert "step-00000002" in caplog.text and "model.safetensors" in caplog.text

    # A checkpoint without a manifest is incomplete and skipped too.
    (second / "manifest.json").unlink()
    assert find_latest(tmp_path) == first
    assert [e.name for e in list_checkpoints(tmp_path)] == ["step-00000001"]


def test_find_latest_falls_back_when_the_pointer_is_stale(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path)
    save_one(tmp_path, "step-00000010", step=10, mgr=mgr)
    newest = save_one(tmp_path, "step-00000020", step=20, mgr=mgr)
    save_one(tmp_path, "step-00000015", step=15, mgr=mgr)  # saved last, but not the highest step
    (tmp_path / "latest").write_text("step-00000099\n")
    with caplog.at_level(logging.WARNING, logger="accelengine.checkpoint"):
        assert find_latest(tmp_path) == newest  # by step recorded in the manifest, not by save order or name
    assert "step-00000099" in caplog.text
    (tmp_path / "latest").unlink()
    assert find_latest(tmp_path) == newest
    assert find_latest(tmp_path / "missing") is None


class _Trap:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_opened(tmp_path):
    sanity = tmp_path / "sanity-marker"
    pickle.loads(pickle.dumps(_Trap(sanity)))  # the payload does work when unpickled
    assert sanity.exists()

    marker = tmp_path / "marker"
    root = tmp_path / "ckpts"
    path = save_one(root)
    payload = pickle.dumps(_Trap(marker))
    for name in ("evil.pkl", "pytorch_model.bin", "optimizer.pt", "model.safetensors.pkl"):
        (path / name).write_bytes(payload)

    assert read_checkpoint(path).parts["engine"] == {"step": 1}
    assert find_latest(root) == path
    assert "evil.pkl" not in format_inspection(inspect_checkpoint(path, verify=True))

    # A pickle swapped in for a listed file fails verification before anything parses it.
    (path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        read_checkpoint(path)
    assert find_latest(root) is None
    assert not marker.exists()


def test_leftover_temp_dirs_are_ignored_then_cleaned(tmp_path):
    mgr = CheckpointManager(tmp_path)
    first = save_one(tmp_path, "step-00000001", step=1, mgr=mgr)
    stale = tmp_path / ".tmp-step-00000002"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    (stale / "manifest.json").write_text("{")
    trash = tmp_path / ".trash-step-00000000"  # a rotation interrupted by a kill
    trash.mkdir()
    assert find_latest(tmp_path) == first
    assert [e.name for e in list_checkpoints(tmp_path)] == ["step-00000001"]

    save_one(tmp_path, "step-00000003", step=3, mgr=mgr)
    assert not stale.exists() and not trash.exists()


def test_resaving_an_existing_name_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = save_one(tmp_path, "step-00000005", step=5, mgr=mgr)
    again = mgr.save("step-00000005", shared={"engine": {"step": 5, "again": True}}, meta={"step": 5})
    assert again == path
    assert read_checkpoint(path).parts == {"engine": {"step": 5, "again": True}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000005"]


def test_a_crash_mid_replace_leaves_a_usable_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = save_one(tmp_path, "step-00000005", step=5, mgr=mgr)
    aside = tmp_path / ".replaced-step-00000005"
    path.rename(aside)  # as if the process died between "rename old aside" and "rename new in"
    assert find_latest(tmp_path) == aside
    assert read_checkpoint(aside).parts["engine"] == {"step": 5}

    save_one(tmp_path, "step-00000006", step=6, mgr=mgr)  # the next save puts the old copy back
    assert not aside.exists()
    assert read_checkpoint(path).parts["engine"] == {"step": 5}


def test_rotation_keeps_last_and_best(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="val/accuracy", mode="max")
    metrics = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: 0.65}
    for step, metric in metrics.items():
        save_one(tmp_path, f"step-{step:08d}", step=step, metric=metric, mgr=mgr)
    assert [e.name for e in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000005"]
    mgr.wait()  # old checkpoints are deleted on a background thread
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000004", "step-00000005"]

    # mode=min keeps the lowest; a NaN metric is never "best"
    low = CheckpointManager(tmp_path / "min", keep_last=1, keep_best=1, monitor="loss", mode="min")
    for step, metric in {1: 3.0, 2: 1.0, 3: float("nan"), 4: 2.0}.items():
        save_one(tmp_path / "min", f"step-{step:08d}", step=step, metric=metric, mgr=low)
    assert [e.step for e in list_checkpoints(tmp_path / "min")] == [2, 4]


def test_rotation_never_deletes_latest_even_when_it_is_not_the_newest_step(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, keep_best=1, monitor="acc")
    for step in (10, 20, 30):
        save_one(tmp_path, f"step-{step:08d}", step=step, metric=step / 100, mgr=mgr)
    # resumed from an older point: the new save has a lower step than what is on disk, and the worst metric
    path = save_one(tmp_path, "step-00000005", step=5, metric=0.0, mgr=mgr)
    assert find_latest(tmp_path) == path
    assert [e.step for e in list_checkpoints(tmp_path)] == [5, 30]
    assert CheckpointManager(tmp_path / "all", keep_last=None).keep_last is None


@pytest.mark.parametrize("fail_at", [1, 3, 4, 5], ids=["first-data-file", "last-part-file", "manifest", "temp-dir"])
def test_disk_full_during_save_leaves_the_previous_checkpoint_and_latest(tmp_path, monkeypatch, fail_at):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    first = save_one(tmp_path, "step-00000001", step=1, mgr=mgr)
    latest_before = (tmp_path / "latest").read_bytes()
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) >= fail_at:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match=r"step-00000002.*(disk|full).*left untouched") as info:
        save_one(tmp_path, "step-00000002", step=2, mgr=mgr)
    assert "ENOSPC" in str(info.value)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]
    assert (tmp_path / "latest").read_bytes() == latest_before
    assert find_latest(tmp_path) == first
    assert read_checkpoint(first).parts["engine"] == {"step": 1}


def test_failure_after_the_rename_does_not_claim_nothing_changed(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    first = save_one(tmp_path, "step-00000001", step=1, mgr=mgr)
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 6:  # 3 part files, the manifest, the temp dir, then the root after the rename
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="syncing") as info:
        save_one(tmp_path, "step-00000002", step=2, mgr=mgr)
    monkeypatch.undo()
    assert "untouched" not in str(info.value)
    assert find_latest(tmp_path) == first  # `latest` was never moved to the unsynced checkpoint


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="not-a-dir"):
        save_one(blocker / "ckpts")


def test_bad_arguments(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for name in ("", ".hidden", "a/b", "latest", "-x"):
        with pytest.raises(CheckpointError, match="invalid checkpoint name"):
            mgr.save(name, shared={})
    with pytest.raises(CheckpointError, match="invalid part name"):
        mgr.save("x", shared={"a.b": {}})
    with pytest.raises(CheckpointError, match="both"):
        mgr.save("x", shared={"a": 1}, per_rank={"a": 2})
    with pytest.raises(ValueError, match="barrier"):
        CheckpointManager(tmp_path, rank=0, world_size=2)
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="best")
    path = mgr.save("x", per_rank={"rng": {"a": 1}})
    with pytest.raises(CheckpointError, match="1 process"):
        read_checkpoint(path, rank=1)
    assert read_checkpoint(path, rank=1, parts=[]).parts == {}


def test_inspect_reports_tensors_without_loading_them(tmp_path):
    model, opt, _ = trained(lambda p: torch.optim.AdamW(p, lr=1e-3))
    path = CheckpointManager(tmp_path).save(
        "step-00000003",
        shared={"model": model.state_dict(), "optimizer": opt.state_dict(), "engine": {"epoch": 1}},
        per_rank={"rng": {"torch": torch.get_rng_state()}},
        meta={"step": 3, "epoch": 1, "metrics": {"val/accuracy": 0.93}},
    )
    info = inspect_checkpoint(path)
    assert (info["step"], info["epoch"], info["metrics"]) == (3, 1, {"val/accuracy": 0.93})
    assert info["parts"]["model"]["tensors"]["0.weight"] == {"dtype": "F32", "shape": [8, 6], "bytes": 192}
    assert info["parts"]["rng.rank0"]["tensors"]["torch"]["dtype"] == "U8"
    assert info["parts"]["engine"]["num_tensors"] == 0
    assert info["total_bytes"] == sum(p.stat().st_size for p in path.iterdir())
    text = format_inspection(info)
    assert "0.weight" in text and "val/accuracy=0.93" in text and "optimizer" in text


# --------------------------------------------------------------------------------------------------------------------
# Two processes, a real gloo barrier, shared filesystem


def _two_rank_worker(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    try:
        root = Path(tmp) / "ckpts"
        mgr = CheckpointManager(root, keep_last=1, rank=rank, world_size=2, barrier=dist.barrier)
        for step in (1, 2):
            random.seed(100 * rank + step)
            np.random.seed(rank)
            torch.manual_seed(rank + step)
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
            shared = {"model": {"w": torch.full((3,), float(step))}} if rank == 0 else None
            path = mgr.save(f"step-{step:08d}", shared=shared, per_rank={"rng": rng}, meta={"step": step})
            ckpt = read_checkpoint(path, rank=rank)
            assert_same(rng, ckpt.parts["rng"])
            assert torch.equal(ckpt.parts["model"]["w"], torch.full((3,), float(step)))
        dist.barrier()
        assert [e.name for e in list_checkpoints(root)] == ["step-00000002"]  # rotated
        assert sorted(p.name for p in path.iterdir()) == sorted(
            ["manifest.json", "model.json", "model.safetensors"]
            + [f"rng.rank{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")]
        )

        # One rank failing must make every rank raise (no deadlock) and leave the last checkpoint alone.
        bad = {"rng": {"oops": (lambda: 0) if rank == 1 else 0}}
        try:
            mgr.save("step-00000003", per_rank=bad, meta={"step": 3})
        except CheckpointError:
            pass
        else:
            raise AssertionError(f"rank {rank}: save should have failed")
        assert find_latest(root) == path
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_save_collectively(tmp_path):
    torch.multiprocessing.spawn(_two_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    ckpt = tmp_path / "ckpts" / "step-00000002"
    assert verify_checkpoint(ckpt)["world_size"] == 2
    assert read_checkpoint(ckpt, rank=1).parts.keys() == {"model", "rng"}


# --------------------------------------------------------------------------------------------------------------------
# Checksums and the single-pass read


def _rewrite_manifest(path, edit, *, earlier=False):
    """Edit a manifest as a writer would: sealed with its own checksum, or as `earlier` versions wrote it (none)."""
    import json

    from accelengine.checkpoint import _sealed

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest.pop("manifest_xxh3_128")  # what saves write now
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest if earlier else _sealed(manifest)))


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text.replace('"step":2', '"step":3'),  # a digit: still valid JSON, every file still matches
        lambda text: text.replace('"world_size":1', '"world_size":2'),
        lambda text: text.replace('"manifest_xxh3_128":"', '"manifest_xxh3_128":"0'),
    ],
    ids=["meta", "world-size", "its-checksum"],
)
def test_a_manifest_changed_after_it_was_written_is_damaged_and_skipped(tmp_path, damage):
    first = save_one(tmp_path, "step-00000001", step=1)
    second = save_one(tmp_path, "step-00000002", step=2)
    text = (second / "manifest.json").read_text()
    assert damage(text) != text
    (second / "manifest.json").write_text(damage(text))
    with pytest.raises(CheckpointError, match=rf"{second.name} is damaged: manifest\.json does not match its own"):
        read_checkpoint(second)
    assert find_latest(tmp_path) == first  # falls back to the intact one


def test_manifests_with_sha256_checksums_of_earlier_saves_are_still_read(tmp_path):
    import hashlib

    model, opt, _ = trained(lambda p: torch.optim.AdamW(p, lr=1e-3))
    path = CheckpointManager(tmp_path).save(
        "step-00000003", shared={"model": model.state_dict(), "opt": opt.state_dict()}
    )

    def to_sha256(manifest):
        for f in manifest["files"]:
            assert set(f) == {"name", "size", "xxh3_128"}  # what saves write now
            del f["xxh3_128"]
            f["sha256"] = hashlib.sha256((path / f["name"]).read_bytes()).hexdigest()

    _rewrite_manifest(path, to_sha256, earlier=True)
    assert_same(read_checkpoint(path).parts["model"], model.state_dict())
    assert find_latest(tmp_path) == path
    _flip(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*sha256"):
        read_checkpoint(path)


def test_an_unknown_checksum_algorithm_is_a_clear_error(tmp_path):
    path = save_one(tmp_path)

    def to_md5(manifest):
        manifest["files"][0]["md5"] = manifest["files"][0].pop("xxh3_128")[:32]

    _rewrite_manifest(path, to_md5)
    with pytest.raises(CheckpointError, match=r"md5.*upgrade accelengine"):
        read_checkpoint(path)


def test_loaded_tensors_each_own_their_memory(tmp_path):
    rng = {"torch": torch.get_rng_state(), "small": torch.arange(3), "scalar": torch.tensor(2.5)}
    path = CheckpointManager(tmp_path).save("x", per_rank={"rng": rng}, shared={"w": {"a": torch.ones(5, 7)}})
    ckpt = read_checkpoint(path)
    tensors = [*ckpt.parts["rng"].values(), ckpt.parts["w"]["a"]]
    assert all(t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes for t in tensors)
    torch.set_rng_state(ckpt.parts["rng"]["torch"])  # torch's own consumers get plain, standalone tensors
    assert torch.equal(torch.get_rng_state(), rng["torch"])


def test_a_file_matching_its_checksum_but_not_laid_out_by_us_is_refused(tmp_path):
    import json
    import struct

    import xxhash

    path = save_one(tmp_path)
    header = {
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    head = json.dumps(header).encode()
    data = struct.pack("<Q", len(head)) + head + bytes(12)  # overlapping tensors: safetensors' loader refuses this
    (path / "model.safetensors").write_bytes(data)

    def refresh(manifest):
        entry = next(f for f in manifest["files"] if f["name"] == "model.safetensors")
        entry.update(size=len(data), xxh3_128=xxhash.xxh3_128(data).hexdigest())

    _rewrite_manifest(path, refresh)
    verify_checkpoint(path)  # the checksum matches
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*not a valid safetensors file"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(created="yesterday"),
        lambda m: m.update(created=None),
        lambda m: m.update(metric=10**400),  # valid JSON, but no float holds it
        lambda m: m.update(meta={"$t": "dict", "v": [1]}),
        lambda m: m.update(meta={"$t": "odict", "v": {}, "metadata": {"$t": "npscalar", "dtype": "<f8", "hex": ""}}),
    ],
    ids=["created-text", "created-null", "metric-overflows", "meta-bad-dict", "meta-empty-scalar"],
)
def test_a_foreign_manifest_with_a_valid_seal_is_named_and_skipped_not_a_crash(tmp_path, edit, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    first = save_one(tmp_path, "step-00000001", step=1, mgr=mgr)
    foreign = save_one(tmp_path / "other", "step-00000002", step=2)
    _rewrite_manifest(foreign, edit)
    foreign.rename(tmp_path / foreign.name)
    foreign = tmp_path / foreign.name
    with pytest.raises(CheckpointError, match=rf"{foreign.name} is damaged: manifest\.json is malformed"):
        read_checkpoint(foreign)
    assert [e.name for e in list_checkpoints(tmp_path)] == ["step-00000001"]
    (tmp_path / "latest").unlink()  # without the pointer every checkpoint is looked at, the newest step first
    with caplog.at_level(logging.WARNING, logger="accelengine.checkpoint"):
        assert find_latest(tmp_path) == first
    assert foreign.name in caplog.text
    # a save numbers itself and rotates past it
    third = save_one(tmp_path, "step-00000003", step=3, mgr=mgr)
    assert [e.name for e in list_checkpoints(tmp_path)] == ["step-00000003"]
    assert read_checkpoint(third).parts["engine"] == {"step": 3}
