"""The loop's position and flags: a small typed record that callbacks read and checkpoints save."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class State:
    """Where the loop is. Counters are *completed* units: `step` optimizer steps done, `epoch` epochs done."""

    task: int = 0
    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    # per-batch scratch, not checkpointed: the current batch, its losses and whether it ended an optimizer step
    batch: Any = None
    _loss: Any = field(default=None, repr=False)  # see `loss`
    loss_value: float | None = None  # `loss` as a float where the engine reads it anyway (one CPU process), else None
    losses: dict[str, Any] = field(default_factory=dict)
    optimizer_stepped: bool = False
    eval_split: str = ""
    # results and control
    last_eval: dict[str, float] = field(default_factory=dict)
    last_train: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    log_count: int = 0  # records logged so far: a resume rewinds metrics.jsonl to this many lines
    pending_eval: str = ""  # "step"/"epoch" while an evaluation inside the loop runs (preemption may interrupt it)
    should_stop: bool = False
    stop_reason: str = ""
    failed: bool = False  # a stop that ends the run as `failed` (e.g. a non-finite loss), not `stopped`
    stop_resumable: bool = False  # every stop requested was one a re-run continues from (a time limit, a preemption)
    preempted: bool = False
    status: str = "created"

    _SAVED = (
        "task",
        "epoch",
        "step",
        "batch_in_epoch",
        "last_eval",
        "last_train",
        "last_eval_step",
        "log_count",
        "pending_eval",
        "should_stop",
        "stop_reason",
    )

    @property
    def loss(self) -> Any:
        """This micro-batch's total loss, detached. On the host the engine keeps it as computed and detaches it only
        when it is read here (a detach costs about as much as reading the value)."""
        loss = self._loss
        return loss.detach() if getattr(loss, "requires_grad", False) else loss

    @loss.setter
    def loss(self, value: Any) -> None:
        self._loss = value

    def request_stop(self, reason: str, failed: bool = False, resumable: bool = False) -> None:
        """Ask the loop to stop at the next step boundary (callbacks call this: early stopping, wall time...);
        `failed=True` ends the run as `failed` rather than `stopped` (a NaN guard). `resumable=True` says the run is
        not over, only paused (a time limit, a preemption): its checkpoints do not hold the stop, so a re-run that
        resumes from them trains on. A stop is resumable only if every request for it was."""
        self.stop_resumable = resumable and (self.stop_resumable or not self.should_stop)
        self.should_stop = True
        self.stop_reason = self.stop_reason or reason
        self.failed = self.failed or failed

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - set(self._SAVED)
        if unknown:
            raise ValueError(f"unknown loop state keys {sorted(unknown)}")
        for k, v in state.items():
            setattr(self, k, dict(v) if isinstance(v, dict) else v)
