"""Non-finite loss guard: stop the run (default) or skip the bad updates."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from accelengine.callbacks.base import Callback

if TYPE_CHECKING:
    from accelengine.engine import Engine

logger = logging.getLogger("accelengine")

FIXES = (
    "lower the learning rate, clip gradients (trainer.max_grad_norm), prefer bf16 to fp16, "
    'or skip such steps (log.nan_guard = "skip")'
)


class NanGuard(Callback):
    """Watches the training loss for NaN/inf.

    `mode="stop"` (default) ends the run as `failed`, with a stop reason naming the first bad optimizer step. It
    adds no host-device synchronisation per step. The check happens, before anything could persist the damage, at
    every step where something is persisted: at a log step it reads the logged mean loss of the window (already on
    the host: a NaN anywhere in the window makes it NaN) before that step's evaluation and `after_fit_step`; at the
    other evaluation and checkpoint steps and at the last step of an epoch or of training, it reads back the step
    losses kept since the last check (references only, nothing is computed per step) in one go; before a
    preemption's checkpoint too (`after_fit`). So no checkpoint is saved after a bad step: the latest checkpoint
    stays the last good one. The weights are damaged from the bad step on, which does not matter as the run stops;
    it may run up to `log_every` steps past the bad one before stopping.
    Epochs of a train set without a length end at a step not known ahead: they are checked at their end
    (`after_fit_epoch`), after the epoch's evaluation and before its checkpoint.
    On one CPU process, where the engine reads every loss as a float anyway (`state.loss_value`), it tells the guard
    of a bad one as it reads it (`on_nonfinite_loss`), at no cost and with no hook run per step: the run stops at the
    bad step itself.

    `mode="skip"` drops the update of every step whose loss (any micro-batch of it) is not finite: the gradients are
    discarded before the optimizer steps (with fp16, the gradient scaler skips such steps itself). The step still
    counts (schedules advance) and the window's logged mean loss shows the NaN. This needs to know before each
    update, so it costs one host-device synchronisation per optimizer step: the price of skipping.

    Across processes the verdict is shared (the logged loss is a mean over processes; the read-back is reduced), so
    every process stops or skips together.

    Args:
        mode: `stop` or `skip`.
        check_every: stop mode only: also check every N optimizer steps (1: every step, one sync each).
    """

    def __init__(self, mode: Literal["stop", "skip"] = "stop", check_every: int | None = None) -> None:
        super().__init__()
        if mode not in ("stop", "skip"):
            raise ValueError(f"NanGuard: mode must be `stop` or `skip`, got {mode!r}")
        if check_every is not None and check_every < 1:
            raise ValueError(f"NanGuard: check_every must be at least 1, got {check_every}")
        self.mode = mode
        self.check_every = check_every
        self.max_pending = 256  # a forced check at least this often, so the kept references stay few
        self.skipped: list[int] = []
        # every micro-batch's loss since the last check (stop mode): detached tensors, or floats on the host (one CPU
        # process: read at once, no sync to avoid there, and no CPU tensor kept alive; see `loss_window`)
        self._losses: list[Any] = []
        self._on_host = False
        # (index into `_losses`, optimizer steps done before it): where the kept losses start, and with accumulation
        # where each epoch's end (whose last step may be short) re-aligns them; `_step_of` names a loss's step
        self._starts: list[tuple[int, int]] = [(0, 0)]
        self._periods: list[int] = []
        self._check_at = 0  # the next periodic check (an optimizer step), so a step costs one comparison
        self._log_every = 1
        self._accumulation = 1
        self._total_steps = 0
        self._steps_per_epoch = 0
        self._batches_per_epoch: int | None = None
        self._check_epoch_ends = False  # an epoch's end persists something but its step is not known ahead
        self._reason = ""  # the stop reason given, if any

    @property
    def key(self) -> str:
        return "nan_guard"

    def idle_hooks(self, engine: Engine) -> tuple[str, ...]:
        accumulating = engine.accelerator.gradient_accumulation_steps > 1
        if self.mode == "stop" and getattr(engine, "losses_on_host", False):  # the engine tells (`on_nonfinite_loss`)
            return ("before_optimizer_step", "fit_step", "after_fit_epoch")
        if self.mode == "stop":  # `after_fit_epoch` marks where a short last step of an accumulation ends, or checks
            epoch_end_used = accumulating or _epoch_end_unplanned(engine)
            return ("before_optimizer_step",) if epoch_end_used else ("before_optimizer_step", "after_fit_epoch")
        # skip mode: `fit_step` only keeps the losses of micro-batches that do not end a step (accumulation)
        return ("after_fit_epoch",) if accumulating else ("fit_step", "after_fit_epoch")

    def before_fit(self, engine: Engine) -> None:
        if self.skipped:  # restored by a resume: the summary lists the steps skipped before it too
            self._summarise_skipped(engine)
        self._on_host = getattr(engine, "losses_on_host", False)
        cfg = engine.config
        ckpt = getattr(engine, "checkpoint_config", None)
        periods = [self.check_every, getattr(ckpt, "every_steps", None)]
        if cfg.steps is not None and engine.eval_loaders:
            periods.append(cfg.eval_every)
        self._periods = sorted({p for p in periods if p})
        self._log_every = cfg.log_every
        self._accumulation = engine.accelerator.gradient_accumulation_steps
        training = engine.train_loader is not None
        # An epoch's end persists something when epochs evaluate (and may save a best checkpoint) or save
        epoch_ends = cfg.steps is None or getattr(ckpt, "every_epochs", None) is not None
        try:
            self._batches_per_epoch = len(engine.train_loader) if training and epoch_ends else None
        except TypeError:  # an iterable data set without a length
            self._batches_per_epoch = None
        self._check_epoch_ends = _epoch_end_unplanned(engine)
        try:
            self._total_steps = engine.total_steps if training else 0
            self._steps_per_epoch = engine.steps_per_epoch if training else 0
        except TypeError:  # epochs of an iterable data set without a length: known only once each has ended
            self._total_steps = self._steps_per_epoch = 0
        self._plan(engine.state.step)
        self._forget(engine.state.step)

    def _plan(self, step: int) -> None:
        """The next step at which the kept losses are checked: the next evaluation or checkpoint step (or
        `check_every`), the end of this epoch when it persists something, the last step, or before too many
        losses are kept. So a step costs one comparison."""
        due = [(step // p + 1) * p for p in self._periods]
        if self._total_steps:  # unknown (0) for epochs of unknown length: their ends check (`after_fit_epoch`)
            due.append(self._total_steps)
        if self._batches_per_epoch and self._steps_per_epoch:
            due.append((step // self._steps_per_epoch + 1) * self._steps_per_epoch)
        due.append(step + max(1, self.max_pending // self._accumulation))
        self._check_at = min(due)

    def _keep(self, state: Any) -> None:
        if self._on_host:
            self._losses.append(state.loss_value)  # the engine read it as a float already
        elif isinstance(state.loss, torch.Tensor):
            self._losses.append(state.loss)  # `state.loss` is detached

    def _forget(self, step: int) -> None:
        """Drop the kept losses; those kept next are of the steps after `step` (always a step boundary)."""
        self._losses.clear()
        self._starts = [(0, step)]

    def _step_of(self, index: int) -> int:
        """The optimizer step (1-based) of the kept loss at `index`: one loss per micro-batch."""
        start, steps_done = next(s for s in reversed(self._starts) if s[0] <= index)
        return steps_done + (index - start) // self._accumulation + 1

    def after_fit_epoch(self, engine: Engine) -> None:  # stop mode on a device, see `idle_hooks`
        if self._check_epoch_ends:
            # Its last step was not known ahead, so it is checked here: after the epoch's evaluation, before the
            # checkpointer (registered later) saves at the epoch's end. All kept losses are of the epoch just done.
            self._plan(engine.state.step)
            index = self._first_bad(engine)
            if index is not None and not engine.state.failed:
                self._stop(engine, index, epoch=engine.state.epoch - 1)
            self._forget(engine.state.step)
            return
        self._starts.append((len(self._losses), engine.state.step))

    def _first_bad(self, engine: Engine) -> int | None:
        """Index of the first kept loss that is not finite on any process (one read-back)."""
        if not self._losses:
            return None
        if self._on_host:
            return next((i for i, value in enumerate(self._losses) if not math.isfinite(value)), None)
        try:
            losses = torch.stack(self._losses)
        except RuntimeError:  # losses of different shapes ((), (1,)): one reshape per value is slower but works
            losses = torch.stack([v.reshape(()) for v in self._losses])
        finite = torch.isfinite(losses)
        if engine.accelerator.num_processes > 1:
            finite = engine.accelerator.reduce((~finite).float(), reduction="sum") == 0
        flags = finite.tolist()  # the one read-back
        return next((i for i, ok in enumerate(flags) if not ok), None)

    def _stop(self, engine: Engine, index: int | None, epoch: int | None = None) -> None:
        if index is None:  # the logged mean says so, but no kept loss does (a loss the guard did not see)
            self._report(engine, None, "nan")
            return
        local = float(self._losses[index])
        value = local if not math.isfinite(local) else "on another process"
        self._report(engine, self._step_of(index), value, epoch)

    def _report(self, engine: Engine, step: int | None, value: Any, epoch: int | None = None) -> None:
        if step is None:
            where = f"in the steps up to {engine.state.step}"
        else:
            if epoch is None:
                epoch = (step - 1) // self._steps_per_epoch if self._steps_per_epoch else engine.state.epoch
            where = f"at step {step} (epoch {epoch})"
        reason = self._reason = f"non-finite loss ({value}) {where}; {FIXES}"
        logger.error(f"stopping: {reason}. Nothing is saved after it: the latest checkpoint is the last good one.")
        engine.state.request_stop(reason, failed=True)

    # --------------------------------------------------------------------------------------------- stop mode --
    def on_nonfinite_loss(self, engine: Engine, value: float) -> None:  # one CPU process: the engine read it
        if self.mode == "stop" and not engine.state.failed:  # the first bad micro-batch is reported, once
            self._report(engine, engine.state.step + 1, value)

    def fit_step(self, engine: Engine) -> None:  # on a device, or in skip mode with accumulation (`idle_hooks`)
        # Callbacks receive fit_step after the engine's step (state.loss is this micro-batch's) and before the
        # step's log record, evaluation and after_fit_step (where checkpoints are saved).
        state = engine.state
        if self.mode == "skip":  # with accumulation only (`idle_hooks`): keep the micro-batches before the last
            if not state.optimizer_stepped:
                self._keep(state)
            return
        self._losses.append(state.loss)  # a reference (detached) for naming the bad step later; no device work
        if state.optimizer_stepped and state.step >= self._check_at:
            self._check(engine)

    def _check(self, engine: Engine) -> None:
        step = engine.state.step
        if step % self._log_every == 0:
            return  # a log step: its training record is checked in on_log (which plans the next check)
        self._plan(step)
        index = self._first_bad(engine)
        if index is not None:
            self._stop(engine, index)
        self._forget(step)

    def on_log(self, engine: Engine, record: dict[str, Any]) -> None:
        loss = record.get("train/loss")
        if self.mode != "stop" or loss is None:
            return  # not a training record
        if self._on_host:
            return  # every loss was checked as it was made
        if not math.isfinite(loss) and not engine.state.failed:  # the window's mean over all processes: the same
            self._stop(engine, self._first_bad(engine))  # verdict everywhere
        self._plan(engine.state.step)
        self._forget(engine.state.step)

    def after_fit(self, engine: Engine) -> None:
        # A preemption stops the run between two checks, and its checkpoint is saved next (the checkpointer's
        # `after_fit`, registered later): the steps since the last check are checked first, so that it cannot hold
        # damaged weights. The run then ends as failed, naming the step, rather than preempted.
        state = engine.state
        if self.mode != "stop" or self._on_host or not state.preempted or state.failed:
            return
        index = self._first_bad(engine)
        if index is not None:
            self._stop(engine, index)
            state.status, state.stop_reason = "failed", self._reason

    # --------------------------------------------------------------------------------------------- skip mode --
    def before_optimizer_step(self, engine: Engine) -> None:  # skip mode only (see `idle_hooks`)
        self._keep(engine.state)  # the step's last micro-batch; earlier: in fit_step
        index = self._first_bad(engine)
        self._forget(engine.state.step)
        if index is None:
            return
        step = engine.state.step + 1
        self.skipped.append(step)
        self._summarise_skipped(engine)
        logger.warning(f"non-finite loss at step {step}: update skipped ({len(self.skipped)} so far)")
        if engine.accelerator.scaler is None:  # fp16's gradient scaler skips non-finite gradients on its own
            engine.optimizer.zero_grad(set_to_none=True)  # no gradient: the optimizer leaves the weights alone

    def _summarise_skipped(self, engine: Engine) -> None:
        engine.summary_extras["skipped_steps"] = {"count": len(self.skipped), "first": self.skipped[:20]}

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": list(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = [int(s) for s in state.get("skipped", [])]


def _epoch_end_unplanned(engine: Engine) -> bool:
    """True when epochs end without the guard knowing their last step ahead (a train set without a length) and an
    epoch's end persists something (epochs evaluate, a checkpoint may be saved)."""
    loader = getattr(engine, "train_loader", None)
    cfg, ckpt = engine.config, getattr(engine, "checkpoint_config", None)
    if loader is None or (cfg.steps is not None and getattr(ckpt, "every_epochs", None) is None):
        return False
    try:
        len(loader)
    except TypeError:
        return True
    return False
