"""The training losses since the last log record, kept on the device until that record is made.

A step only appends a reference to its (detached) loss: no arithmetic, so no device work and no host-device
synchronisation between log steps. A log step stacks the window and averages it in one go. A window longer than
`FOLD` entries (a large `log_every` times the accumulation) is folded into a partial sum, so memory stays bounded.
The window's exact contents are checkpointed, so a resumed run logs bit for bit the means of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

FOLD = 1024


class LossWindow:
    """Named loss terms (`loss` first) of each micro-batch since the last `take()`."""

    def __init__(self) -> None:
        self.loss: list[torch.Tensor] = []  # the total loss of each micro-batch
        self.terms: dict[str, list[torch.Tensor]] = {"loss": self.loss}
        self.folded: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (sum, count) of entries folded away

    def __len__(self) -> int:
        return len(self.loss) + (self.folded["loss"][1] if "loss" in self.folded else 0)

    def append(self, loss: torch.Tensor) -> None:
        """Append one micro-batch's total loss, already detached (the common case: a single loss term)."""
        self.loss.append(loss)
        if len(self.loss) >= FOLD:
            self.fold("loss")

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Append one micro-batch's named terms (detached here); the total `loss` is among them."""
        for name, value in terms.items():
            window = self.terms.get(name)
            if window is None:
                window = self.terms[name] = []
            window.append(value.detach())
            if len(window) >= FOLD:
                self.fold(name)

    def fold(self, name: str) -> None:
        window = self.terms[name]
        total, count = _sum(window), len(window)
        if name in self.folded:
            before, before_count = self.folded[name]
            total, count = before + total, before_count + count
        self.folded[name] = (total, count)
        window.clear()

    def take(self) -> tuple[list[str], torch.Tensor | None]:
        """The mean of each term since the last take, as names and one device tensor (nothing read back); then
        starts a new window."""
        names, means = [], []
        for name, window in self.terms.items():
            total, count = (_sum(window), len(window)) if window else (None, 0)
            if name in self.folded:
                before, before_count = self.folded[name]
                total, count = (before if total is None else before + total), before_count + count
            if count:
                names.append(name)
                means.append(total / count)
        self.clear()
        return names, (torch.stack(means) if means else None)

    def take_floats(self) -> tuple[list[str], list[float]]:
        """`take`, read on the host: for CPU tensors, where reading a value needs no synchronisation. Python sums
        the values faster than a stack, a sum and a division do (each tensor op costs several microseconds when it
        runs only once per log step, its code cold)."""
        names, means = [], []
        for name, window in self.terms.items():
            total, count = sum(map(torch.Tensor.item, window)), len(window)
            if name in self.folded:
                before, before_count = self.folded[name]
                total, count = total + before.item(), count + before_count
            if count:
                names.append(name)
                means.append(total / count)
        self.clear()
        return names, means

    def clear(self) -> None:
        for window in self.terms.values():
            window.clear()  # in place: `self.loss` is one of them
        self.folded.clear()

    def state_dict(self) -> dict[str, Any]:
        terms: dict[str, Any] = {}
        for name, window in self.terms.items():
            entry: dict[str, Any] = {}
            if window:
                entry["window"] = torch.stack([v.reshape(()) for v in window])
            if name in self.folded:
                entry["folded_sum"], entry["folded_count"] = self.folded[name]
            if entry:
                terms[name] = entry
        return {"micro_batches": len(self), "terms": terms}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.clear()
        for name, entry in state["terms"].items():
            window = self.terms.setdefault(name, [])
            if "window" in entry:
                window.extend(entry["window"].to(device).unbind(0))
            if "folded_sum" in entry:
                self.folded[name] = (entry["folded_sum"].to(device), int(entry["folded_count"]))
        if len(self) != state["micro_batches"]:
            raise ValueError(f"loss window holds {len(self)} micro-batches, expected {state['micro_batches']}")


def _sum(window: list[torch.Tensor]) -> torch.Tensor:
    try:
        stacked = torch.stack(window)
    except RuntimeError:  # terms of different shapes ((), (1,)): one reshape each is slower but works
        stacked = torch.stack([v.reshape(()) for v in window])
    return stacked.float().sum()
