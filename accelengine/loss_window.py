"""The training losses since the last log record.

On a device, a step only appends a reference to its (detached) loss: no arithmetic, so no device work and no
host-device synchronisation between log steps; a log step stacks the window and averages it in one go (`take`).

On the host (one CPU process, `on_host`), each loss is read as it is made, into a Python float (`take_floats` then
sums floats). There is nothing to synchronise with, and a kept CPU tensor would pin its few-byte buffer in the C
heap among the large buffers the next steps allocate and free, and glibc then returns heap pages and faults them in
again, over and over (measured on an MLP 64-2048-10: 2,000-4,000 page faults per 200 steps and 2-13 % slower steps
while 50 losses were kept as tensors, none with floats).

A window longer than `FOLD` entries (a large `log_every` times the accumulation) is folded into a partial sum, so
memory stays bounded. The window's exact contents are checkpointed, so a resumed run logs bit for bit the means of an
uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

FOLD = 1024

Entry = Any  # a detached loss tensor (on a device) or a float (on the host)


class LossWindow:
    """Named loss terms (`loss` first) of each micro-batch since the last take."""

    def __init__(self, on_host: bool = False) -> None:
        self.on_host = on_host
        self.loss: list[Entry] = []  # the total loss of each micro-batch
        self.terms: dict[str, list[Entry]] = {"loss": self.loss}
        self.folded: dict[str, tuple[Entry, int]] = {}  # name -> (sum, count) of entries folded away

    def __len__(self) -> int:
        return len(self.loss) + (self.folded["loss"][1] if "loss" in self.folded else 0)

    def append(self, entry: Entry) -> None:
        """Append one micro-batch's total loss (the common case: a single loss term) as an entry: the detached loss,
        or on the host its value (`loss.item()`). The engine appends to `self.loss` directly when the window cannot
        grow past `FOLD`."""
        self.loss.append(entry)
        if len(self.loss) >= FOLD:
            self.fold("loss")

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Append one micro-batch's named terms (detached here); the total `loss` is among them."""
        for name, value in terms.items():
            window = self.terms.get(name)
            if window is None:
                window = self.terms[name] = []
            window.append(value.item() if self.on_host else value.detach())
            if len(window) >= FOLD:
                self.fold(name)

    def fold(self, name: str) -> None:
        window = self.terms[name]
        total, count = self._sum(window), len(window)
        if name in self.folded:
            before, before_count = self.folded[name]
            total, count = before + total, before_count + count
        self.folded[name] = (total, count)
        window.clear()

    def take(self) -> tuple[list[str], torch.Tensor | None]:
        """The mean of each term since the last take, as names and one device tensor (nothing read back); then
        starts a new window."""
        names, totals = self._totals()
        means = [torch.as_tensor(total) / count for total, count in totals]
        return names, (torch.stack(means) if means else None)

    def take_floats(self) -> tuple[list[str], list[float]]:
        """`take`, read on the host (for a window `on_host`): Python sums the floats, with no tensor op at all (a
        tensor op that runs once per log step, its code cold, costs several microseconds)."""
        names, totals = self._totals()
        return names, [float(total) / count for total, count in totals]

    def _totals(self) -> tuple[list[str], list[tuple[Entry, int]]]:
        """The terms with entries, each with (sum, count) over the window and what was folded away; then clears."""
        names, totals = [], []
        for name, window in self.terms.items():
            total, count = (self._sum(window) if window else None), len(window)
            if name in self.folded:
                before, before_count = self.folded[name]
                total, count = (before if total is None else before + total), before_count + count
            if count:
                names.append(name)
                totals.append((total, count))
        self.clear()
        return names, totals

    def clear(self) -> None:
        for window in self.terms.values():
            window.clear()  # in place: `self.loss` is one of them
        self.folded.clear()

    def state_dict(self) -> dict[str, Any]:
        terms: dict[str, Any] = {}
        for name, window in self.terms.items():
            entry: dict[str, Any] = {}
            if window:
                entry["window"] = _as_tensor(window)
            if name in self.folded:
                total, entry["folded_count"] = self.folded[name]
                entry["folded_sum"] = torch.tensor(total, dtype=torch.float64) if self.on_host else total
            if entry:
                terms[name] = entry
        return {"micro_batches": len(self), "terms": terms}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Load a window saved on the host or on a device into this one, in this window's kind of entry (floats
        saved as float64 come back exactly)."""
        self.clear()
        for name, entry in state["terms"].items():
            window = self.terms.setdefault(name, [])
            if "window" in entry:
                saved = entry["window"]
                window.extend(saved.tolist() if self.on_host else saved.to(device).unbind(0))
            if "folded_sum" in entry:
                total = entry["folded_sum"]
                total = total.item() if self.on_host else total.to(device)
                self.folded[name] = (total, int(entry["folded_count"]))
        if len(self) != state["micro_batches"]:
            raise ValueError(f"loss window holds {len(self)} micro-batches, expected {state['micro_batches']}")

    def _sum(self, window: list[Entry]) -> Entry:
        return sum(window) if self.on_host else _as_tensor(window).float().sum()


def _as_tensor(window: list[Entry]) -> torch.Tensor:
    """The window as one tensor: floats (exact, as float64) or the stacked loss tensors."""
    if not isinstance(window[0], torch.Tensor):
        return torch.tensor(window, dtype=torch.float64)
    try:
        return torch.stack(window)
    except RuntimeError:  # terms of different shapes ((), (1,)): one reshape each is slower but works
        return torch.stack([v.reshape(()) for v in window])
