"""The callback base: one no-op method per engine hook, cadence declared at registration."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelengine.engine import Engine

# The lifecycle, in the order callbacks see it (see `Engine.fit`). `before_optimizer_step` runs inside the engine's
# `fit_step` (after backward and clipping, before the optimizer steps), so callbacks see it before `fit_step`, which
# they receive once the engine's step is done. `on_log` is called with each logged record, `on_nonfinite_loss` with
# a NaN or infinite training loss the engine read on the host.
HOOKS: tuple[str, ...] = (
    "before_fit",
    "before_task",
    "before_fit_epoch",
    "before_fit_step",
    "before_optimizer_step",
    "fit_step",
    "after_fit_step",
    "after_fit_epoch",
    "before_eval",
    "before_eval_step",
    "eval_step",
    "after_eval_step",
    "after_eval",
    "after_task",
    "after_fit",
)
# Hooks that know whether the current batch completes an optimizer step: `every_n_steps` gates these two.
STEP_HOOKS = frozenset({"before_optimizer_step", "after_fit_step"})
EPOCH_HOOKS = frozenset({"before_fit_epoch", "after_fit_epoch"})


class Callback:
    """Subclass and override the hooks you need; each receives the engine (`engine.state` holds the position).

    Cadence is declared, not tested in the hook: `every_n_steps=N` calls `before_optimizer_step` and
    `after_fit_step` only for optimizer steps whose number (1-based) is a multiple of N; `every_n_epochs=N` calls
    the epoch hooks every N epochs.
    A callback with state implements `state_dict`/`load_state_dict`; it is then checkpointed under `key`.
    Stop training with `engine.state.request_stop("reason")`.
    """

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = None) -> None:
        for name, v in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if v is not None and v < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be at least 1, got {v}")
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs

    @property
    def key(self) -> str:
        """Name under which this callback's state is checkpointed (unique per class by default)."""
        return type(self).__name__

    def on_log(self, engine: Engine, record: dict[str, Any]) -> None:
        """Called with each logged record: `{"step": .., "epoch": .., "split/name": value, ...}`."""

    def on_nonfinite_loss(self, engine: Engine, value: float) -> None:
        """Called when the engine reads a training loss that is NaN or infinite, as soon as it is read, before its
        backward (`state.step + 1` is the optimizer step it belongs to). Only where the engine reads every loss as
        a float anyway: one CPU process (`engine.losses_on_host`). Elsewhere reading a loss would cost a host-device
        synchronisation per step, so a callback that watches losses reads them back itself (see `NanGuard`)."""

    def idle_hooks(self, engine: Engine) -> Collection[str]:
        """Hooks this callback implements but has nothing to do in, for this run and process (its mode, the
        accumulation, not the main process...): the engine never calls them. Asked once, before `before_fit`."""
        return ()


def _noop(self: Callback, engine: Engine) -> None:
    """Hook: does nothing unless overridden."""


for _hook in HOOKS:
    setattr(Callback, _hook, _noop)


def overrides(callback: Callback, hook: str) -> bool:
    """True when the callback's class implements `hook` itself (no-op base methods are never dispatched)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)
