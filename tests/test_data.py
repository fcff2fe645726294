"""Data sets and loaders: HF tables from files, batched reads equal per-sample reads."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from accelengine.data import (
    EpochShuffle,
    HFTable,
    IndexBatches,
    TensorTable,
    from_files,
    index_tensor,
    make_loader,
    set_epoch,
    split_batch,
)
from accelengine.errors import EngineError


@pytest.fixture
def table():
    import datasets

    g = torch.Generator().manual_seed(0)
    return datasets.Dataset.from_dict({"input": torch.randn(50, 4, generator=g).numpy(), "label": list(range(50))})


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_from_files(tmp_path, table, fmt):
    path = tmp_path / f"data.{fmt}"
    flat = table.map(lambda r: {f"f{i}": r["input"][i] for i in range(4)}).remove_columns("input")
    getattr(flat, f"to_{fmt}")(str(path))
    loaded = from_files(str(path))
    assert len(loaded) == 50 and loaded[7]["label"] == 7 and loaded[7]["f0"] == pytest.approx(flat[7]["f0"])
    assert from_files(str(path), columns=["label"]).column_names == ["label"]


def test_from_files_errors(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        from_files(str(tmp_path / "missing.csv"))
    with pytest.raises(EngineError, match="unknown format"):
        from_files(str(tmp_path / "data.xlsx"))


def test_hf_table_batches_equal_rows(table):
    loader = make_loader(table, batch_size=8, shuffle=False)
    assert isinstance(loader.dataset, HFTable)
    batches = list(loader)
    assert len(batches) == 7 and batches[-1]["input"].shape == (2, 4)
    rows = table.with_format("torch")[list(range(50))]
    assert torch.equal(torch.cat([b["input"] for b in batches]), rows["input"])
    assert torch.equal(torch.cat([b["label"] for b in batches]), rows["label"])


def test_tensor_table_equals_default_collation():
    ds = TensorDataset(torch.randn(37, 3), torch.arange(37))
    fast = make_loader(ds, batch_size=8, shuffle=False)
    assert isinstance(fast.dataset, TensorTable)
    slow = DataLoader(ds, batch_size=8, shuffle=False)
    for a, b in zip(fast, slow, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_batched_reads_of_any_column_count_equal_collated_rows(count):
    # one and three columns take the loop, two the display (`_column_reader`); pickled tables bind theirs again
    import datasets

    g = torch.Generator().manual_seed(count)
    columns = [torch.randn(20, 3, generator=g), torch.arange(20), torch.randint(0, 9, (20, 2), generator=g)][:count]
    names = ["input", "label", "extra"][:count]
    indices = [7, 0, 19, 7, 3]
    tensors = TensorTable(TensorDataset(*columns))
    hf = HFTable(datasets.Dataset.from_dict({n: c.numpy() for n, c in zip(names, columns, strict=True)}))
    assert hf.columns is not None
    for table in (tensors, pickle.loads(pickle.dumps(tensors))):
        _assert_batches_equal(table.__getitems__(indices), default_collate([tensors[i] for i in indices]))
    for table in (hf, pickle.loads(pickle.dumps(hf))):
        batch = table.__getitems__(indices)
        assert list(batch) == names
        _assert_batches_equal(batch, default_collate([hf[i] for i in indices]))
        _assert_batches_equal(batch, {n: c[indices] for n, c in zip(names, columns, strict=True)})


def test_subclassed_tensor_dataset_is_left_alone():
    class Doubling(TensorDataset):
        def __getitem__(self, i):
            x, y = super().__getitem__(i)
            return 2 * x, y

    loader = make_loader(Doubling(torch.ones(4, 2), torch.arange(4)), batch_size=2, shuffle=False)
    assert torch.equal(next(iter(loader))[0], 2 * torch.ones(2, 2))


def test_split_batch():
    x, y = torch.ones(2), torch.zeros(2)
    assert split_batch((x, y), "input", "label") == (x, y)
    assert split_batch({"pixels": x, "label": y}, "pixels", "label") == (x, y)
    assert split_batch(x, "input", "label") == (x, None)
    with pytest.raises(EngineError, match=r"data\.input_key"):
        split_batch({"pixels": x}, "input", "label")


def test_hf_table_arrow_path_equals_in_memory_path(table, monkeypatch):
    import accelengine.data as data

    in_memory = HFTable(table)
    assert in_memory.columns is not None
    monkeypatch.setattr(data, "MATERIALIZE_BYTES", 0)
    arrow = HFTable(table)
    assert arrow.columns is None
    for indices in ([3, 1, 4, 1, 5], list(range(50))):
        a, b = in_memory.__getitems__(indices), arrow.__getitems__(indices)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(in_memory[7]["input"], arrow[7]["input"])


def test_hf_table_with_text_column_stays_on_arrow():
    import datasets

    table = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 2]})
    assert HFTable(table).columns is None
    assert HFTable(table).__getitems__([2, 0])["text"] == ["c", "a"]


def test_index_tensor_equals_torch_tensor():
    for indices in (
        [5],
        [3, 1, 4, 1, 5],
        list(range(5000, 0, -7)),
        [-1, 2**63 - 1, -(2**63)],
        [True, 2],
        [np.int64(4), 7],
    ):
        got = index_tensor(indices)
        assert got.dtype == torch.long and torch.equal(got, torch.tensor(indices, dtype=torch.long)), indices
    # what the packed path refuses goes through torch: the same result, or the same error
    assert index_tensor([]).dtype == torch.long and index_tensor([]).shape == (0,)
    assert torch.equal(index_tensor([1.0, 2.0]), torch.tensor([1, 2]))
    assert torch.equal(index_tensor((2, 0)), torch.tensor([2, 0]))
    got = index_tensor(torch.tensor([2, 0], dtype=torch.int32))
    assert got.dtype == torch.long and torch.equal(got, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="Overflow"):
        index_tensor([2**64])


def test_index_tensor_owns_its_memory():
    indices = [4, 2, 9]
    first = index_tensor(indices)
    second = index_tensor([7, 7, 7])  # the same size: must not reuse the first one's buffer
    indices[0] = 0
    assert first.tolist() == [4, 2, 9] and second.tolist() == [7, 7, 7]


def _tensor_dataset(n: int = 50) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, generator=torch.Generator().manual_seed(1)), torch.arange(n))


def _assert_batches_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("source", ["hf", "tensor"])
def test_shuffled_batches_equal_per_sample_reads(table, source):
    ds = table if source == "hf" else _tensor_dataset()
    rows = table.with_format("torch") if source == "hf" else ds
    loader = make_loader(ds, batch_size=8, shuffle=True, seed=3)
    orders = []
    for epoch in (0, 1):
        set_epoch(loader, epoch)
        # the order is a function of (seed, epoch) alone: checkpoints and resumes rely on this exact permutation
        order = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch)).tolist()
        batches = list(loader)
        assert len(batches) == 7  # 50 = 6 x 8 + a last batch of 2
        for start, batch in zip(range(0, 50, 8), batches, strict=True):
            _assert_batches_equal(batch, default_collate([rows[i] for i in order[start : start + 8]]))
        orders.append(order)
    assert orders[0] != orders[1]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("size", "batch"), [(50, 8), (48, 8), (5, 8), (0, 4), (7, 1)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_index_batches_are_torchs_batches(shuffle, size, batch, drop_last):
    from torch.utils.data import BatchSampler, SequentialSampler

    sampler = EpochShuffle(size, seed=4) if shuffle else SequentialSampler(range(size))
    if shuffle:
        sampler.set_epoch(3)
    ours = IndexBatches(sampler, batch_size=batch, drop_last=drop_last)
    torchs = BatchSampler(sampler, batch_size=batch, drop_last=drop_last)
    assert list(ours) == list(torchs) and len(ours) == len(torchs)
    assert all(type(indices) is list for indices in ours)  # Accelerate's sharding edits them as lists


def test_epoch_shuffle_order():
    sampler = EpochShuffle(10, seed=5)
    sampler.set_epoch(2)
    assert list(sampler) == torch.randperm(10, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2)).tolist()
    assert list(sampler) == list(sampler) and sorted(sampler) == list(range(10))


@pytest.mark.parametrize("split_batches", [False, True])
@pytest.mark.parametrize("even_batches", [True, False])
@pytest.mark.parametrize("source", ["hf", "tensor"])
def test_batches_under_accelerate_sharding(table, source, split_batches, even_batches):
    """Two processes: Accelerate's `BatchSamplerShard` edits the index lists (the last, uneven batch is completed with
    the first indices, in place); every batch must hold exactly the rows of the indices it was given."""
    from accelerate.data_loader import prepare_data_loader

    ds = table if source == "hf" else _tensor_dataset()
    seen = []
    for process in (0, 1):
        loader = prepare_data_loader(
            make_loader(ds, batch_size=8, shuffle=True, seed=1),
            num_processes=2,
            process_index=process,
            split_batches=split_batches,
            even_batches=even_batches,
        )
        index_batches = list(loader.batch_sampler)
        batches = list(loader)
        assert len(batches) == len(index_batches) > 0
        for indices, batch in zip(index_batches, batches, strict=True):
            inputs, labels = (batch["input"], batch["label"]) if source == "hf" else batch
            assert labels.tolist() == indices  # label i is row i
            assert torch.equal(
                inputs, (table.with_format("torch")["input"] if source == "hf" else ds.tensors[0])[indices]
            )
        seen += [i for indices in index_batches for i in indices]
    assert set(seen) == set(range(50))
    if even_batches and not split_batches:
        assert len(seen) == 64  # 4 batches of 8 on each process: the last one completed with the first indices


def test_skip_first_batches_reads_no_skipped_batch(table):
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    loader = prepare_data_loader(
        make_loader(table, batch_size=8, shuffle=True, seed=2), num_processes=1, process_index=0
    )
    loader.set_epoch(1)
    full = list(loader)
    calls = []
    dataset = loader.dataset
    read = dataset.__getitems__
    dataset.__getitems__ = lambda indices: calls.append(indices) or read(indices)
    loader.set_epoch(1)
    resumed = list(skip_first_batches(loader, 3))
    assert len(calls) == len(full) - 3 == len(resumed)
    for a, b in zip(full[3:], resumed, strict=True):
        _assert_batches_equal(a, b)


def test_tables_survive_pickling(table):
    """A spawned DataLoader worker receives the table pickled."""
    for ds in (HFTable(table), TensorTable(_tensor_dataset())):
        clone = pickle.loads(pickle.dumps(ds))
        _assert_batches_equal(clone.__getitems__([3, 1, 4]), ds.__getitems__([3, 1, 4]))
