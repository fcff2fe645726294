"""Synthetic data made on the fly, for tests and benchmarks."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def classification(
    samples: int = 512, features: int = 16, classes: int = 4, seed: int = 0, noise: float = 0.5, task_seed: int = 0
) -> TensorDataset:
    """Gaussian blobs around class centres. `task_seed` fixes the centres (the task), `seed` the samples drawn from
    it: two sets with the same task_seed and different seeds are a train/val split of one problem."""
    centres = torch.randn(classes, features, generator=torch.Generator().manual_seed(task_seed)) * 2
    g = torch.Generator().manual_seed(10_000 + seed)
    y = torch.randint(0, classes, (samples,), generator=g)
    x = centres[y] + noise * torch.randn(samples, features, generator=g)
    return TensorDataset(x, y)
