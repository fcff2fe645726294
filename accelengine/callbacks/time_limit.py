"""Stop cleanly before a wall-time limit (a SLURM allocation, a budget)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

from accelengine.callbacks.base import Callback

if TYPE_CHECKING:
    from accelengine.engine import Engine

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(value: float | str) -> float:
    """Seconds from a number or a text such as `"90s"`, `"45m"`, `"1h30m"`, `"2d"` or `"01:30:00"` (h:m:s)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(:\d{1,2}){1,2}", value.strip()):
        seconds = 0.0
        for part in value.strip().split(":"):
            seconds = seconds * 60 + int(part)
    elif isinstance(value, str) and re.fullmatch(r"(\s*\d+(\.\d+)?\s*[dhms]\s*)+", value):
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", value))
    else:
        raise ValueError(f"cannot read the duration {value!r}: use seconds, or e.g. '45m', '1h30m', '01:30:00'")
    if seconds <= 0:
        raise ValueError(f"a time limit must be positive, got {value!r}")
    return seconds


class TimeLimit(Callback):
    """Requests a stop at the first optimizer step after `max_time` of training (seconds or e.g. `"3h50m"`), counted
    from the start of this `fit` call. The run ends as `stopped` and the checkpointer's end-of-run save keeps the
    work. One clock read per step; nothing touches the device."""

    def __init__(self, max_time: float | str) -> None:
        super().__init__()
        self.max_seconds = parse_duration(max_time)
        self._deadline = float("inf")

    def before_fit(self, engine: Engine) -> None:
        self._deadline = time.monotonic() + self.max_seconds

    def after_fit_step(self, engine: Engine) -> None:
        if engine.state.optimizer_stepped and time.monotonic() >= self._deadline:
            engine.state.request_stop(  # resumable: a re-run resumes from the end-of-run checkpoint and trains on
                f"time limit: {self.max_seconds:g} s of training reached at step {engine.state.step}", resumable=True
            )
