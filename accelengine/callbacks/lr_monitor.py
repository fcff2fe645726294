"""Learning rate (and optionally momentum) of every optimizer parameter group, added to the training record."""

from __future__ import annotations

from typing import TYPE_CHECKING

from accelengine.callbacks.base import Callback

if TYPE_CHECKING:
    from accelengine.engine import Engine


def log_step_due(engine: Engine, every: int | None) -> bool:
    """True after an optimizer step whose number is a multiple of `every` (default: the trainer's `log_every`).
    Monitors that hand their values to the engine (`log_next`) use it: by default they join the log steps' training
    records; at another cadence, the engine logs them at their own steps."""
    state = engine.state
    return state.optimizer_stepped and state.step % (every or engine.config.log_every) == 0


class LearningRateMonitor(Callback):
    """Adds `lr/<group>` for each parameter group (its `name` when the group has one, else its index) to the training
    record, and `momentum/<group>` (SGD momentum or Adam's beta1) with `momentum=True`. Host values only: no sync.

    Args:
        every_n_steps: optimizer steps between records; default the trainer's `log_every`.
        momentum: also record the momentum of each group.
    """

    def __init__(self, every_n_steps: int | None = None, momentum: bool = False) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"LearningRateMonitor: every_n_steps must be at least 1, got {every_n_steps}")
        self.every = every_n_steps
        self.momentum = momentum

    def fit_step(self, engine: Engine) -> None:
        # callbacks receive fit_step once the engine's step is done, before that step's log record is made
        if engine.optimizer is None or not log_step_due(engine, self.every):
            return
        values: dict[str, float] = {}
        for i, group in enumerate(engine.optimizer.param_groups):
            name = str(group.get("name", i))
            values[f"lr/{name}"] = float(group["lr"])
            if self.momentum:
                beta = group.get("momentum", (group.get("betas") or (None,))[0])
                if beta is not None:
                    values[f"momentum/{name}"] = float(beta)
        engine.log_next(values)
