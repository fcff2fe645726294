"""Data sets and loaders: torch `Dataset`s, HuggingFace `datasets` tables, or any component returning one.

HuggingFace tables are read a whole batch at a time (`table[indices]`, one Arrow slice) rather than row by row,
which is what makes them as fast as an in-memory `TensorDataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from accelengine.errors import EngineError


def is_hf_dataset(obj: Any) -> bool:
    """True for a `datasets.Dataset`, checked without importing `datasets`."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "with_format") and hasattr(obj, "features")


class HFTable(Dataset):
    """A HuggingFace `datasets.Dataset` served as torch tensors, a batch per Arrow read."""

    def __init__(self, table: Any, columns: list[str] | None = None) -> None:
        self.table = table.with_format("torch", columns=columns)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.table[index]

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # torch's fetcher calls this with the whole batch of indices; the result is already collated
        return self.table[indices]


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
) -> DataLoader:
    """A DataLoader for a torch Dataset or HF table (a DataLoader is returned unchanged)."""
    if isinstance(dataset, DataLoader):
        return dataset
    collate = None
    if is_hf_dataset(dataset):
        dataset = HFTable(dataset)
        collate = _collate_passthrough
    if not isinstance(dataset, (Dataset, IterableDataset)) and not hasattr(dataset, "__getitem__"):
        raise EngineError(
            f"expected a torch Dataset, a HuggingFace Dataset or a DataLoader, got {type(dataset).__name__}"
        )
    if isinstance(dataset, IterableDataset):
        shuffle = False  # an iterable data set shuffles itself
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
    )


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
