"""Synthetic data made on the fly, for tests and benchmarks."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def classification(
    samples: int = 512, features: int = 16, classes: int = 4, seed: int = 0, noise: float = 0.5
) -> TensorDataset:
    """Gaussian blobs around random class centres: learnable, deterministic for a given seed."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g) * 2
    y = torch.randint(0, classes, (samples,), generator=g)
    x = centres[y] + noise * torch.randn(samples, features, generator=g)
    return TensorDataset(x, y)
