"""Data sets and loaders: torch `Dataset`s, HuggingFace `datasets` tables, or any component returning one.

Tables are read a whole batch at a time rather than row by row: a HuggingFace table with one Arrow slice
(`table[indices]`), a `TensorDataset` with one indexing per tensor. The loader hands the batch over as it is, with
no per-sample collation; this is most of the loader's cost on small models.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    SequentialSampler,
    TensorDataset,
)

from accelengine.errors import EngineError


def is_hf_dataset(obj: Any) -> bool:
    """True for a `datasets.Dataset`, checked without importing `datasets`."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "with_format") and hasattr(obj, "features")


@functools.lru_cache(maxsize=64)
def _int64s(n: int) -> struct.Struct:
    return struct.Struct(f"={n}q")  # n int64s, native byte order (as torch reads them), no padding


def index_tensor(indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The int64 tensor of a batch of indices: what `torch.tensor(indices, dtype=torch.long)` gives, faster.

    The batch sampler hands over a list of Python ints (Accelerate's `BatchSamplerShard` edits batches as lists, so
    they stay lists). `torch.tensor(list)` inspects every element in Python: about 6 us for 64 indices, a quarter of
    a batch's cost. Packing them with `struct` and viewing the bytes takes about 1.5 us (9x less for 8,192). The
    tensor owns its buffer (a fresh `bytearray`: `frombuffer` wants it writable and keeps it alive)."""
    if type(indices) is list and indices:
        try:
            packed = bytearray(_int64s(len(indices)).pack(*indices))
        except struct.error:  # not an integer, or out of the int64 range: torch raises its usual error below
            pass
        else:
            return torch.frombuffer(packed, dtype=torch.long)
    return torch.as_tensor(indices, dtype=torch.long)


# HF tables up to this size whose columns are all numeric are read into tensors once: a random batch is then one
# indexing per column instead of an Arrow `take` (about 13x faster for small rows). Larger tables stay on disk.
MATERIALIZE_BYTES = 1 << 30


class _ColumnTable(Dataset):
    """A table whose batch read (`__getitems__`) is a closure set on the instance by `_bind_reader` (see
    `_column_reader`); pickling (a spawned loader worker gets the table pickled) leaves it out and binds it again."""

    def _bind_reader(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "__getitems__"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._bind_reader()


class HFTable(_ColumnTable):
    """A HuggingFace `datasets.Dataset` served as torch tensors, a batch per read (see `MATERIALIZE_BYTES`)."""

    def __init__(self, table: Any, columns: list[str] | None = None) -> None:
        self.table = table.with_format("torch", columns=columns)
        self.columns: dict[str, torch.Tensor] | None = None
        if table.data.nbytes <= MATERIALIZE_BYTES:
            whole = self.table[:]
            if all(isinstance(v, torch.Tensor) for v in whole.values()):
                self.columns = whole
        self._bind_reader()

    def _bind_reader(self) -> None:
        if self.columns is not None:  # shadows the method below: the batch read of the materialized columns
            self.__getitems__ = _column_reader(tuple(self.columns.items()))

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.columns is not None:
            return {k: v[index] for k, v in self.columns.items()}
        return self.table[index]

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        # torch's fetcher calls this with the whole batch of indices; the result is already collated. A table read
        # into tensors has its own, faster `__getitems__` (`_bind_reader`); this one reads Arrow.
        return self.table[indices]


class TensorTable(_ColumnTable):
    """A `TensorDataset` read a batch at a time: `[t[indices] for t in tensors]`, the same values and order as
    per-sample reads followed by the default collation."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors
        self._bind_reader()

    def _bind_reader(self) -> None:  # `__getitems__`: the batch as a list, one `index_select` per tensor
        self.__getitems__ = _column_reader(tuple(enumerate(self.tensors)), as_list=True)

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)


def _column_reader(columns: tuple[tuple[Any, torch.Tensor], ...], as_list: bool = False) -> Callable[[Any], Any]:
    """The batch read of in-memory columns (`(name, tensor)` pairs): a dict by name, or a list in column order.

    It is a closure set on each table as `__getitems__`, which torch's fetcher looks up on the instance: the
    columns' `index_select` methods are bound once, so a batch reads no attribute and tests nothing. Two columns,
    the common `(input, label)` table, are read in one dict or list display, no loop: on a 64-feature MLP batch that
    is about half a percent of the loader's time, measured (`benchmarks/data_throughput.py`)."""
    names = tuple(name for name, _ in columns)
    selects = tuple(column.index_select for _, column in columns)
    if len(columns) == 2:
        (first, second), (select_first, select_second) = names, selects
        if as_list:

            def read_pair(indices: Any) -> Any:
                index = index_tensor(indices)
                return [select_first(0, index), select_second(0, index)]

        else:

            def read_pair(indices: Any) -> Any:
                index = index_tensor(indices)
                return {first: select_first(0, index), second: select_second(0, index)}

        return read_pair
    # more columns: plain loops (on Python 3.11 a comprehension builds and calls a function object per batch)
    if as_list:

        def read_list(indices: Any) -> Any:
            index = index_tensor(indices)
            values = []
            for select in selects:
                values.append(select(0, index))
            return values

        return read_list
    named = tuple(zip(names, selects, strict=True))

    def read_dict(indices: Any) -> Any:
        index = index_tensor(indices)
        batch = {}
        for name, select in named:
            batch[name] = select(0, index)
        return batch

    return read_dict


class EpochShuffle(Sampler[int]):
    """A shuffling sampler whose order is a function of (seed, epoch) alone, so every process draws the same
    permutation (Accelerate then shards it), a resumed epoch replays it exactly, and it touches no global random
    state. Indices come from one `randperm(...).tolist()` per epoch: no Python generator runs per sample."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def order(self) -> list[int]:
        """This epoch's permutation of the indices."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        return iter(self.order())


class IndexBatches(BatchSampler):
    """torch's `BatchSampler` over an `EpochShuffle` or a `SequentialSampler`, the same batches, made by slicing the
    epoch's whole order rather than by appending indices one at a time: measured with the permutation drawn, 1.3 us
    a batch of 64 instead of 1.6-2.4 (the loader of a 64-feature table: 3.11M to 3.25M samples/s; a resume skipping
    100,000 batches: 40 to 14 ms). Being a `BatchSampler` with a `sampler`, Accelerate shards it, skips its first
    batches on a resume and sets its epoch as it does torch's."""

    def __iter__(self):
        sampler = self.sampler
        order = sampler.order() if isinstance(sampler, EpochShuffle) else range(len(sampler))
        size = self.batch_size
        stop = len(order) - len(order) % size if self.drop_last else len(order)
        if isinstance(order, range):
            return (list(order[start : start + size]) for start in range(0, stop, size))
        return (order[start : start + size] for start in range(0, stop, size))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def _collate_passthrough(batch: Any) -> Any:
    return batch


def from_files(path: str, format: str | None = None, columns: list[str] | None = None) -> Any:
    """A HuggingFace `datasets.Dataset` from a local csv, json/jsonl or parquet file (format from the suffix)."""
    try:
        import datasets
    except ImportError as err:
        raise EngineError("reading files needs HuggingFace `datasets`: pip install 'accelengine[data]'") from err
    suffix = (format or Path(path).suffix.lstrip(".")).lower()
    readers = {
        "csv": datasets.Dataset.from_csv,
        "json": datasets.Dataset.from_json,
        "jsonl": datasets.Dataset.from_json,
        "parquet": datasets.Dataset.from_parquet,
    }
    if suffix not in readers:
        raise EngineError(f"cannot read `{path}`: unknown format `{suffix}`; use csv, json, jsonl or parquet")
    if not Path(path).exists():
        raise EngineError(f"data file `{path}` does not exist")
    table = readers[suffix](str(path))
    return table.select_columns(columns) if columns else table


def make_loader(
    dataset: Any,
    *,
    batch_size: int,
    shuffle: bool,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader for a torch Dataset or HF table (a DataLoader is returned unchanged). Batches of indices come
    from `IndexBatches`; shuffling uses `EpochShuffle(seed)`, whose epoch the engine sets through `set_epoch` below.
    The shuffling sampler is `loader.batch_sampler.sampler`: `loader.sampler` is torch's placeholder for a loader
    given a batch sampler, so call `set_epoch(loader, epoch)` rather than `loader.sampler.set_epoch`."""
    if isinstance(dataset, DataLoader):
        return dataset
    collate = None
    if is_hf_dataset(dataset):
        dataset = HFTable(dataset)
        collate = _collate_passthrough
    elif type(dataset) is TensorDataset:  # exactly: a subclass may override __getitem__
        dataset = TensorTable(dataset)
        collate = _collate_passthrough
    if not isinstance(dataset, (Dataset, IterableDataset)) and not hasattr(dataset, "__getitem__"):
        raise EngineError(
            f"expected a torch Dataset, a HuggingFace Dataset or a DataLoader, got {type(dataset).__name__}"
        )
    options: dict[str, Any] = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    if isinstance(dataset, IterableDataset):  # it shuffles itself, if at all
        return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, collate_fn=collate, **options)
    sampler = EpochShuffle(len(dataset), seed) if shuffle else SequentialSampler(dataset)
    batches = IndexBatches(sampler, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, **options)


def split_batch(batch: Any, input_key: str, target_key: str) -> tuple[Any, Any]:
    """(inputs, target) of a batch: a pair/list `(x, y)`, a dict with the configured keys, or a lone tensor."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        if input_key not in batch:
            raise EngineError(
                f"batch has no column `{input_key}` (it has {sorted(batch)}): set `data.input_key` to the input column"
            )
        return batch[input_key], batch.get(target_key)
    return batch, None


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a loader's sampler (or its data set) which epoch starts: Accelerate's prepared loaders forward it; a
    plain `DataLoader` is given it here."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
        return
    for target in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None), loader.dataset):
        if hasattr(target, "set_epoch"):
            target.set_epoch(epoch)
            return
