"""Console (and log file) lines for logged records, main process only."""

from __future__ import annotations

from typing import Any

from accelengine.callbacks.base import Callback
from accelengine.rundir import info_line


def format_record(record: dict[str, Any]) -> str:
    head = f"epoch {record.get('epoch', 0)} step {record.get('step', 0)}"
    body = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if "/" in k)
    return f"{head}  {body}"


class ConsoleLogger(Callback):
    """Writes each logged record as one line through the `accelengine` logger (console and `log.txt`)."""

    def on_log(self, engine, record: dict[str, Any]) -> None:
        if engine.is_main_process:
            info_line(format_record(record))  # `logger.info`, without its per-line overhead
