"""Data sets and loaders: HF tables from files, batched reads equal per-sample reads."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from accelengine.data import HFTable, TensorTable, from_files, make_loader, split_batch
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
