"""Stop when a monitored evaluation metric stops improving."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from accelengine.callbacks.base import Callback
from accelengine.callbacks.progress import monitor_mode
from accelengine.errors import EngineError

if TYPE_CHECKING:
    from accelengine.engine import Engine


class EarlyStopping(Callback):
    """Stops training after `patience` evaluations in a row without an improvement of more than `min_delta` in
    `monitor`. `mode` says whether smaller (`min`) or larger (`max`) is better; unset, the monitor's name says
    (`val/loss`, `val/error`... min; `val/accuracy`, `val/f1`... max) and any other name needs it. A non-finite value
    never counts as an improvement. Its best value, step and wait count are checkpointed (key `early_stopping`)."""

    def __init__(
        self, monitor: str, mode: Literal["min", "max"] | None = None, patience: int = 3, min_delta: float = 0.0
    ) -> None:
        super().__init__()
        mode = monitor_mode(monitor, mode, "EarlyStopping")
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be at least 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"EarlyStopping: min_delta must be 0 or more, got {min_delta}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.wait = 0

    @property
    def key(self) -> str:
        return "early_stopping"

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def after_eval(self, engine: Engine) -> None:
        results = engine.state.last_eval
        if engine.train_loader is None or not results:
            return
        if self.monitor not in results:
            raise EngineError(
                f"early stopping monitors `{self.monitor}`, which the evaluation does not produce; "
                f"it produced {', '.join(f'`{k}`' for k in results)}"
            )
        value = results[self.monitor]
        if self.improved(value):
            self.best, self.best_step, self.wait = value, engine.state.step, 0
            return
        self.wait += 1
        if self.wait >= self.patience and not engine.trained_full_length:  # else nothing is left to stop: completed
            best = f"{self.best:.6g} at step {self.best_step}" if self.best is not None else "none finite"
            engine.state.request_stop(
                f"early stopping: {self.monitor} did not improve for {self.wait} evaluations (best {best})"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.wait = state["best"], state["best_step"], int(state["wait"])
