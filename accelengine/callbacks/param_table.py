"""Parameter counts at the start of training: trainable, frozen and buffer elements per top-level module."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.parameter import is_lazy

from accelengine.callbacks.base import Callback

if TYPE_CHECKING:
    from accelengine.engine import Engine

logger = logging.getLogger("accelengine")


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def count_parameters(model: nn.Module) -> list[tuple[str, str, int, int, int]]:
    """Rows `(module, type, trainable, frozen, buffers)`, one per top-level child holding tensors, plus `(own)` for
    tensors held by the model itself; a tensor shared between modules is counted once, where it is first seen. The
    tensors of lazy modules not initialised yet (`nn.LazyLinear` before its first forward) have no size: not counted."""
    seen: set[int] = set()
    rows = []
    children = list(model.named_children())
    for name, module in [*children, ("(own)", model)]:
        trainable = frozen = buffers = 0
        params = module.parameters(recurse=module is not model)
        bufs = module.buffers(recurse=module is not model)
        for p in params:
            if id(p) in seen or is_lazy(p):
                continue
            seen.add(id(p))
            if p.requires_grad:
                trainable += p.numel()
            else:
                frozen += p.numel()
        for b in bufs:
            if id(b) not in seen and not is_lazy(b):
                seen.add(id(b))
                buffers += b.numel()
        if trainable or frozen or buffers:  # modules without tensors (activations) would only add noise
            rows.append((name, type(module).__name__, trainable, frozen, buffers))
    return rows


def format_table(rows: list[tuple[str, str, int, int, int]]) -> str:
    total = ("total", "", *(sum(r[i] for r in rows) for i in (2, 3, 4)))
    cells = [("module", "type", "trainable", "frozen", "buffers")]
    cells += [(n, t, human(a), human(b), human(c)) for n, t, a, b, c in [*rows, total]]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    lines = []
    for i, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if i == 0 or i == len(cells) - 2:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ParamTable(Callback):
    """Prints the parameter table when training starts (main process) and puts the totals in the summary
    (`summary_extras["params"]`)."""

    def before_fit(self, engine: Engine) -> None:
        model = engine.unwrapped_model()
        rows = count_parameters(model)
        params = {
            "trainable": sum(r[2] for r in rows),
            "frozen": sum(r[3] for r in rows),
            "buffers": sum(r[4] for r in rows),
        }
        lazy = {id(t) for t in (*model.parameters(), *model.buffers()) if is_lazy(t)}
        if lazy:  # the counts are then partial: say so, rather than let them pass for the model's size
            params["uninitialized_tensors"] = len(lazy)
        engine.summary_extras["params"] = params
        if engine.is_main_process:
            logger.info(format_table(rows))
            if lazy:
                logger.info(f"(not counted: {len(lazy)} tensors of lazy modules, sized at their first forward)")
