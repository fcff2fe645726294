"""The end of a run: `summary.json` and a few printed lines (status, best metric and when, stop reason, speed)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from accelengine.callbacks.base import Callback
from accelengine.callbacks.progress import format_duration, headline_metric, lower_is_better
from accelengine.rundir import write_json

if TYPE_CHECKING:
    from accelengine.engine import Engine

logger = logging.getLogger("accelengine")


class RunSummary(Callback):
    """Tracks the best value of `monitor` over evaluations and, when the run ends, writes `engine.summary()` to
    `summary.json` (main process) and prints a short summary (`print_summary`).

    The engine registers it last, after your callbacks, so whatever any callback puts in `engine.summary_extras` up to
    and including `after_fit` is in `summary.json`. `monitor` defaults to `checkpoint.monitor` (with its mode), else
    the first non-loss evaluation metric; `mode` defaults to `min` for loss-like names, else `max`.
    """

    def __init__(
        self, monitor: str | None = None, mode: Literal["min", "max"] | None = None, print_summary: bool = True
    ) -> None:
        super().__init__()
        if mode not in (None, "min", "max"):
            raise ValueError(f"RunSummary: mode must be `min` or `max`, got {mode!r}")
        self.monitor, self.mode, self.print_summary = monitor, mode, print_summary
        self.best: dict[str, Any] = {}

    @property
    def key(self) -> str:
        return "run_summary"

    def before_fit(self, engine: Engine) -> None:
        ckpt = getattr(engine, "checkpoint_config", None)
        if self.monitor is None and getattr(ckpt, "monitor", None):
            self.monitor, self.mode = ckpt.monitor, self.mode or ckpt.mode
        if self.best:
            engine.summary_extras["best"] = dict(self.best)

    def after_eval(self, engine: Engine) -> None:
        results = engine.state.last_eval
        metric = self.monitor or headline_metric(results)
        if metric is None or metric not in results:
            return
        value = results[metric]
        mode = self.mode or ("min" if lower_is_better(metric) else "max")
        old = self.best.get("value") if self.best.get("metric") == metric else None
        better = old is None or (value < old if mode == "min" else value > old)
        if math.isfinite(value) and better:
            state = engine.state
            self.best = {"metric": metric, "mode": mode, "value": value, "step": state.step, "epoch": state.epoch}
            engine.summary_extras["best"] = dict(self.best)

    def after_fit(self, engine: Engine) -> None:
        if not engine.is_main_process:
            return
        summary = engine.summary()
        if engine.out_dir is not None:
            write_json(Path(engine.out_dir) / "summary.json", summary)
        if self.print_summary:
            for line in summary_lines(summary, engine.out_dir):
                logger.info(line)

    def state_dict(self) -> dict[str, Any]:
        return {"best": dict(self.best)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state.get("best") or {})


def summary_lines(summary: dict[str, Any], out_dir: Path | str | None = None) -> list[str]:
    """The printed end-of-run summary."""
    speed = f", {summary['steps_per_s']} steps/s" if summary.get("steps_per_s") else ""
    lines = [
        f"run {summary['status']} in {format_duration(summary.get('wall_time_s') or 0)}: "
        f"{summary.get('steps', 0)} steps, {summary.get('epochs', 0)} epochs{speed}"
    ]
    if summary.get("stop_reason"):
        lines.append(f"stop reason: {summary['stop_reason']}")
    best = summary.get("best")
    if best:
        lines.append(f"best {best['metric']} {best['value']:.4g} at step {best['step']} (epoch {best['epoch']})")
    final = summary.get("final") or {}
    if final:
        lines.append("final: " + "  ".join(f"{k} {v:.4g}" for k, v in final.items()))
    if out_dir is not None:
        lines.append(f"run directory: {out_dir}")
    return lines
