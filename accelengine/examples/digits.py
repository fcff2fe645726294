"""scikit-learn's bundled handwritten digits (1,797 real 8x8 images, shipped inside the package: no download),
as a HuggingFace `datasets.Dataset` with columns `input` (64 floats in [0, 1]) and `label` (0-9)."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from accelengine.errors import EngineError


def digits(
    split: Literal["train", "val", "test", "all"] = "train",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
) -> Any:
    """One split of the digits; the splits are disjoint and fixed by `split_seed`."""
    try:
        import datasets
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise EngineError(
            "the digits recipe needs scikit-learn and datasets: pip install 'accelengine[examples]'"
        ) from err
    if split not in ("train", "val", "test", "all"):
        raise EngineError(f"unknown digits split `{split}`: choose train, val, test or all")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(y))
    n_test, n_val = int(len(y) * test_fraction), int(len(y) * val_fraction)
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
        "all": order,
    }
    idx = np.sort(parts[split])
    return datasets.Dataset.from_dict({"input": x[idx], "label": y[idx]})
