"""Preemption: a signal sets a flag; all processes agree on it at the next step boundary; the run checkpoints and
exits with `EXIT_PREEMPTED`; under SLURM the job is requeued.

Agreement costs nothing on the hot path: with several processes each boundary starts an asynchronous all-reduce of
the flag on a CPU (gloo) group and reads the one started at the previous boundary, which has long finished. So every
rank stops at the same boundary, one boundary after the signal, without a host-device synchronisation. A single
process has nobody to agree with: its signal handler sets the loop's stop flags itself, and the loop, which tests
them at every step boundary anyway, stops there; no hook runs per step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from typing import Any

import torch

from accelengine.callbacks.base import Callback

logger = logging.getLogger("accelengine")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; never 0, so no scheduler mistakes it for success
NO_REQUEUE = "ACCELENGINE_NO_REQUEUE"  # set by whoever owns the job (a sweep session, submitit): do not requeue it


class Preempted(Exception):
    """Raised inside an evaluation when the processes agreed to stop; the run checkpoints and exits."""


class PreemptionHandler(Callback):
    """Turns the configured signals into a clean stop with a checkpoint (see the module docstring)."""

    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1")) -> None:
        super().__init__()
        self.signals = [getattr(signal, s) if isinstance(s, str) else s for s in signals]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._buffer: torch.Tensor | None = None
        self._work: Any = None
        self._distributed = False
        self._state: Any = None  # one process: the loop state the signal handler flags (see the module docstring)

    @property
    def key(self) -> str:
        return "preemption"

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags: the loop acts at the next step boundary. Nothing is logged here: a write to a stream that the
        # interrupted code was writing to may fail as a reentrant call.
        self.received = signum
        if self._state is not None:
            self._mark(self._state)

    def idle_hooks(self, engine) -> tuple[str, ...]:
        # one process: the signal handler sets the stop flags itself, so there is nothing to poll at step boundaries
        return () if engine.accelerator.num_processes > 1 else ("after_fit_step",)

    def before_fit(self, engine) -> None:
        self._distributed = engine.accelerator.num_processes > 1
        self._state = None if self._distributed else engine.state
        if self._distributed:
            import torch.distributed as dist

            # a CPU group, so that agreeing never touches the accelerator's stream
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        if self.received is not None and self._state is not None:
            self._mark(self._state)  # it came while the run was set up (`EarlySignals`): stop before the first step

    def release(self, engine) -> None:
        """The run's very last act (the engine calls it after every callback's `after_fit`): put the signal handlers
        back and, if preempted, requeue the SLURM job. Not earlier: requeueing makes SLURM end the job, and a signal
        with the default handler back would kill it, so the preemption checkpoint must already be written."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._state = None
        if engine.state.status == "preempted":
            name, step = self._signal_name(), engine.state.step
            logger.warning("%s received: stopped at step %d (status preempted)", name, step)
            requeue()

    def agreed(self) -> bool:
        """True when some process received a signal (as of the previous boundary); call at every boundary."""
        if not self._distributed:
            return self.received is not None
        import torch.distributed as dist

        result = False
        if self._work is not None:
            self._work.wait()
            result = bool(self._buffer.item())
        self._buffer = torch.tensor([0 if self.received is None else 1], dtype=torch.int32)
        self._work = dist.all_reduce(self._buffer, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return result

    def after_fit_step(self, engine) -> None:  # several processes only (`idle_hooks`)
        if engine.state.optimizer_stepped and self.agreed():
            self._mark(engine.state)

    def after_eval_step(self, engine) -> None:
        if self.agreed():
            self._mark(engine.state)
            raise Preempted()

    def _mark(self, state: Any) -> None:
        state.preempted = True
        state.request_stop(f"preempted by {self._signal_name()}", resumable=True)

    def _signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another process"


class EarlySignals:
    """Holds the signals that arrive while a run is built and set up, before its `PreemptionHandler` is in place
    (loading a large data set or checkpoint can take minutes). With their default action such a signal would end the
    process at once: no exit code a scheduler retries, no requeue, so a preempted SLURM job would be gone. A context
    manager: from `hand_to(handler)` on, what arrives goes to that handler, which stops the run before its first step.
    """

    def __init__(self, signals: list[str] | tuple[str, ...]) -> None:
        self.signals = [getattr(signal, s) if isinstance(s, str) else s for s in signals]
        self.received: int | None = None
        self._handler: PreemptionHandler | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> EarlySignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signum
        if self._handler is not None:
            self._handler._on_signal(signum, frame)

    def hand_to(self, handler: PreemptionHandler) -> None:
        """Pass what arrived so far, and what arrives from now on, to the run's handler."""
        self._handler = handler
        if self.received is not None and handler.received is None:
            handler.received = self.received


def requeue() -> None:
    """Put the SLURM job back in the queue, unless submitit manages it (its own checkpoint protocol requeues)."""
    job = os.environ.get("SLURM_JOB_ID")
    if (
        not job
        or os.environ.get(NO_REQUEUE)
        or os.environ.get("SUBMITIT_EXECUTOR")
        or os.environ.get("RANK", "0") != "0"
    ):
        return
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    target = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else job
    try:
        subprocess.run(["scontrol", "requeue", target], check=True, timeout=30, capture_output=True)
        logger.warning("requeued SLURM job %s", target)
    except (OSError, subprocess.SubprocessError) as err:
        logger.error("could not requeue SLURM job %s: %s", target, err)
