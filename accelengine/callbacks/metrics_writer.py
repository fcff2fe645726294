"""`metrics.jsonl`: one JSON object per logged record, written by the main process only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from accelengine.callbacks.base import Callback


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf": strict JSON readers reject bare NaN
    return v


class MetricsWriter(Callback):
    """Appends every logged record to `metrics.jsonl` in the run directory and flushes it, so a killed run loses
    nothing that was logged."""

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        super().__init__()
        self.filename = filename
        self._file = None

    def before_fit(self, engine) -> None:
        if engine.out_dir is not None and engine.is_main_process:
            path = Path(engine.out_dir) / self.filename
            _rewind(path, engine.state.log_count)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def on_log(self, engine, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self._file.flush()

    def after_fit(self, engine) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _rewind(path: Path, records: int) -> None:
    """Keep the first `records` lines: what was logged after the checkpoint a resume starts from is dropped, so
    every record appears once (a fresh run starts from zero records)."""
    if not path.exists():
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    if len(lines) != records:
        kept = [line for line in lines[:records] if line.endswith(b"\n")]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        tmp.replace(path)
