"""How the engine drives backward, the optimizer step and zero_grad.

Accelerate's `AcceleratedOptimizer` and `Accelerator.backward` exist for gradient scaling (fp16), XLA, DeepSpeed,
Megatron and friends. Without any of those they add only host-side Python on every step — in accelerate 1.15,
`AcceleratedOptimizer.step()` probes for an optional package with an uncached `importlib.util.find_spec` twice per
step, `zero_grad()` builds an `inspect.signature` per step, and `backward` divides the loss by the accumulation
count even when it is 1 — together about a third of a small model's step on a CPU. So the engine calls the torch
optimizer directly when nothing needs the wrapper (`direct`), and goes through Accelerate otherwise (`accelerate`).
DDP needs no wrapper: the prepared model all-reduces gradients in `backward` itself. Both paths train identically
(tests/test_stepping.py).
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import DistributedType

# Distributed types whose optimizer step is the plain torch one (gradients are synchronised by DDP in backward).
_DIRECT_TYPES = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}


class OptimizerDriver:
    """`backward(loss)`, `step()`, `zero_grad()` and `step_was_skipped()` for one prepared optimizer."""

    def __init__(self, accelerator: Any, optimizer: Any, force_accelerate: bool = False) -> None:
        self.accelerator = accelerator
        self.optimizer = optimizer
        raw = optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper
        # with a single micro-batch per step every batch steps: no need to ask Accelerate each time
        self.accumulating = accelerator.gradient_accumulation_steps > 1
        self.direct = (
            not force_accelerate
            and accelerator.scaler is None
            and accelerator.distributed_type in _DIRECT_TYPES
            and type(raw).__module__.startswith("torch.optim")  # e.g. not LOMO, whose step needs the loss
        )
        self.path = "direct" if self.direct else "accelerate"
        # `backward(loss)`, `step()` and `zero_grad()` are the underlying callables themselves: no call in between.
        # (`zero_grad` sets gradients to None by default, in torch and in Accelerate's wrapper.)
        if self.direct:
            accumulation = accelerator.gradient_accumulation_steps
            self.backward = _scaled_backward(accumulation) if accumulation > 1 else torch.Tensor.backward
            self.step = raw.step
            self.zero_grad = raw.zero_grad
        else:
            self.backward = accelerator.backward
            self.step = optimizer.step
            self.zero_grad = optimizer.zero_grad

    def step_was_skipped(self) -> bool:
        """True when the gradient scaler skipped the step (inf/nan gradients in fp16): never on the direct path."""
        return not self.direct and self.accelerator.optimizer_step_was_skipped


def _scaled_backward(accumulation: int):
    def backward(loss: torch.Tensor) -> None:
        # the same as Accelerate: each micro-batch contributes its share of the accumulated gradient
        (loss / accumulation).backward()

    return backward
