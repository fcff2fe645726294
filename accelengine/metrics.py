"""Evaluation metrics computed over the whole evaluation set.

The engine gathers predictions and targets across processes (dropping the duplicates Accelerate pads the last
uneven batch with) before `update`, so every metric sees each sample exactly once. Running sums stay on the device;
`compute` is the only place that reads them back.

A metric is anything with `update(preds, target)`, `compute()` and `reset()` (torchmetrics objects qualify), or a
plain callable `fn(preds, target) -> scalar tensor` (a batch mean), which is averaged weighted by batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Metric:
    """Base: running sums as tensors on the device of the first update."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> torch.Tensor | float:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError


class Accuracy(Metric):
    """Top-k classification accuracy from logits (or scores) of shape (N, C) and integer targets (N,)."""

    def __init__(self, top_k: int = 1) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        self.reset()

    def reset(self) -> None:
        self.correct: torch.Tensor | int = 0
        self.total = 0

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.ndim == target.ndim:  # already class indices
            hits = preds == target
        elif self.top_k == 1:
            hits = preds.argmax(dim=-1) == target
        else:
            hits = (preds.topk(self.top_k, dim=-1).indices == target.unsqueeze(-1)).any(dim=-1)
        self.correct = self.correct + hits.sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor | float:
        return self.correct / self.total if self.total else float("nan")


class MeanLoss(Metric):
    """Mean of a mean-reduced loss over the whole set: each batch weighted by its size, so the last short batch
    counts for what it holds."""

    def __init__(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self.reset()

    def reset(self) -> None:
        self.sum: torch.Tensor | float = 0.0
        self.count = 0

    def update(self, preds: Any, target: Any) -> None:
        n = len(target) if target is not None else len(preds)
        self.sum = self.sum + self.loss_fn(preds, target).detach().float() * n
        self.count += n

    def compute(self) -> torch.Tensor | float:
        return self.sum / self.count if self.count else float("nan")


def as_metric(obj: Any) -> Any:
    """A metric object as is; a plain callable wrapped as a batch-size weighted mean."""
    if all(hasattr(obj, m) for m in ("update", "compute", "reset")):
        return obj
    if callable(obj):
        return MeanLoss(obj)
    raise TypeError(f"{obj!r} is not a metric: give an object with update/compute/reset or a callable(preds, target)")


def to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu())
    return float(value)
