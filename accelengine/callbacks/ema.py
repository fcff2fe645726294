"""Exponential moving average of the weights: an EMA model, or the teacher of a teacher-student setup."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from accelengine.callbacks.base import Callback
from accelengine.errors import EngineError

if TYPE_CHECKING:
    from accelengine.engine import Engine


def momentum_at(update: int, total: int, base: float, final: float = 1.0, schedule: str = "cosine") -> float:
    """The momentum of the `update`-th update (0-based) of `total`: `base` at the first, rising to `final` on a half
    cosine (stable-ssl's teacher schedule); `constant` keeps `base`."""
    if schedule == "constant" or total <= 0:
        return base
    progress = min(update / total, 1.0)
    return final - (final - base) * (1 + math.cos(math.pi * progress)) / 2


class EMA(Callback):
    """Keeps `ema = m * ema + (1 - m) * weights` after every optimizer step (every `every_n_steps`-th).

    The momentum `m` starts at `momentum` and rises to `final_momentum` on a cosine over training (teacher-student
    training, so it needs the number of steps: epochs of a train set without a length need `constant`);
    `schedule="constant"` keeps it fixed. The update is a single `torch._foreach_lerp_` on the device:
    nothing is read back. Buffers (e.g. batch-norm statistics) are copied from the model (`buffers="copy"`) or
    averaged too (`buffers="ema"`, floating-point buffers only).

    `use_for_eval=True` swaps the averaged weights in for every evaluation (the reported metrics are the EMA
    model's) and the trained weights back afterwards. `ema_state_dict()` gives the averaged weights under the model's
    own `state_dict` keys, for export; `copy_to(model)` loads them into a model. The averages are checkpointed
    through `state_dict`/`load_state_dict` (key `ema`).
    """

    def __init__(
        self,
        momentum: float = 0.999,
        final_momentum: float = 1.0,
        schedule: Literal["cosine", "constant"] = "cosine",
        use_for_eval: bool = False,
        buffers: Literal["copy", "ema"] = "copy",
        every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"EMA: every_n_steps must be at least 1, got {every_n_steps}")
        self.every = every_n_steps or 1
        for name, v in (("momentum", momentum), ("final_momentum", final_momentum)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"EMA: {name} must be between 0 and 1, got {v}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"EMA: schedule must be `cosine` or `constant`, got {schedule!r}")
        if buffers not in ("copy", "ema"):
            raise ValueError(f"EMA: buffers must be `copy` or `ema`, got {buffers!r}")
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.schedule = schedule
        self.use_for_eval = use_for_eval
        self.buffer_mode = buffers
        self.updates = 0
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self._pending: dict[str, Any] | None = None
        self._backup: list[torch.Tensor] | None = None
        self._total = 0

    @property
    def key(self) -> str:
        return "ema"

    # ------------------------------------------------------------------------------------------------ set-up --
    def before_fit(self, engine: Engine) -> None:
        self._total = self._updates_in(engine)
        self._bind(engine.unwrapped_model())

    def _updates_in(self, engine: Engine) -> int:
        """How many updates training makes: the cosine schedule's length."""
        if engine.train_loader is None:
            return 1
        try:
            return max(engine.total_steps // self.every, 1)
        except TypeError as err:  # epochs of an iterable data set without a length
            if self.schedule == "constant":
                return 1
            raise EngineError(
                "EMA: the cosine momentum schedule needs the number of training steps, but the train set has no "
                "length (an iterable data set) and training is set in epochs: set `trainer.steps`, or use "
                '`schedule = "constant"`'
            ) from err

    def _bind(self, model: nn.Module) -> None:
        """Pair the model's tensors with their averages (created from the weights on first use)."""
        self._model = model
        named_params = dict(model.named_parameters())
        named_buffers = dict(model.named_buffers())
        if not self.params:
            self.params = {n: p.detach().clone() for n, p in named_params.items()}
            self.buffers = {n: b.detach().clone() for n, b in named_buffers.items()}
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None
        self._trained = [(self.params[n], p) for n, p in named_params.items() if p.requires_grad]
        averaged = [(self.buffers[n], b) for n, b in named_buffers.items() if b.is_floating_point()]
        copied = [(self.buffers[n], b) for n, b in named_buffers.items() if not b.is_floating_point()]
        if self.buffer_mode == "copy":
            copied, averaged = copied + averaged, []
        self._lerp = ([e for e, _ in self._trained + averaged], [m.detach() for _, m in self._trained + averaged])
        self._copy = ([e for e, _ in copied], [m.detach() for _, m in copied])
        # everything that the swap for evaluation exchanges: trained weights and floating buffers
        self._swap = [(e, m) for e, m in self._trained] + [
            (self.buffers[n], b) for n, b in named_buffers.items() if b.is_floating_point()
        ]

    # ---------------------------------------------------------------------------------------------- updating --
    def current_momentum(self) -> float:
        return momentum_at(self.updates, self._total, self.momentum, self.final_momentum, self.schedule)

    @torch.no_grad()
    def fit_step(self, engine: Engine) -> None:
        # right after the optimizer step, so the step's evaluation and checkpoint already see this update
        state = engine.state
        if not state.optimizer_stepped or not self.params or state.step % self.every:
            return
        weight = 1.0 - self.current_momentum()
        if self._lerp[0] and weight > 0.0:
            torch._foreach_lerp_(self._lerp[0], self._lerp[1], weight)
        if self._copy[0]:
            torch._foreach_copy_(self._copy[0], self._copy[1])
        self.updates += 1

    # ----------------------------------------------------------------------------------------- evaluation --
    @torch.no_grad()
    def before_eval(self, engine: Engine) -> None:
        if not self.use_for_eval or not self.params or self._backup is not None:
            return
        ema, model = [e for e, _ in self._swap], [m.detach() for _, m in self._swap]
        self._backup = [m.clone() for m in model]
        torch._foreach_copy_(model, ema)

    @torch.no_grad()
    def after_eval(self, engine: Engine) -> None:
        if self._backup is None:
            return
        torch._foreach_copy_([m.detach() for _, m in self._swap], self._backup)
        self._backup = None

    def after_fit(self, engine: Engine) -> None:
        # An evaluation cut short (preemption, an error) never reached after_eval: put the trained weights back
        # before anything after this (the final checkpoint) sees the model.
        self.after_eval(engine)

    # ------------------------------------------------------------------------------------------------- export --
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's `state_dict` keys (load with `model.load_state_dict`)."""
        if not self.params:
            raise RuntimeError("EMA: no averages yet; they are created when training starts (fit)")
        # Matched by identity: a tied weight is in `state_dict` under each of its names, in `named_parameters` once.
        model = self._model
        averages = {id(p): self.params[n] for n, p in model.named_parameters()}
        averages.update((id(b), self.buffers[n]) for n, b in model.named_buffers())
        return {k: averages.get(id(v), v) for k, v in model.state_dict(keep_vars=True).items()}

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model` (e.g. a fresh copy of the architecture, for export)."""
        model.load_state_dict(self.ema_state_dict())

    # --------------------------------------------------------------------------------------------- checkpoint --
    def state_dict(self) -> dict[str, Any]:
        return {"params": dict(self.params), "buffers": dict(self.buffers), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.params:
            self._load(state)
        else:
            self._pending = state  # restored before training started: applied when the model is bound

    @torch.no_grad()
    def _load(self, state: dict[str, Any]) -> None:
        for kind, mine in (("params", self.params), ("buffers", self.buffers)):
            theirs = state.get(kind, {})
            missing = set(mine) - set(theirs)
            if missing:
                raise ValueError(f"EMA state has no {kind} {sorted(missing)[:5]}: was it saved for another model?")
            for name, tensor in mine.items():
                tensor.copy_(theirs[name])
        self.updates = int(state.get("updates", 0))
