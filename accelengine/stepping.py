"""How the engine drives backward, the optimizer step and zero_grad.

Accelerate's `AcceleratedOptimizer` and `Accelerator.backward` exist for gradient scaling (fp16), XLA, DeepSpeed,
Megatron and friends. Without any of those they add only host-side Python on every step — in accelerate 1.15,
`AcceleratedOptimizer.step()` probes for an optional package with an uncached `importlib.util.find_spec` twice per
step, `zero_grad()` builds an `inspect.signature` per step, and `backward` divides the loss by the accumulation
count even when it is 1 — together about a third of a small model's step on a CPU. So the engine calls the torch
optimizer directly when nothing needs the wrapper (`direct`), and goes through Accelerate otherwise (`accelerate`).
DDP needs no wrapper: the prepared model all-reduces gradients in `backward` itself. Both paths train identically
(tests/test_stepping.py).

torch's own `Optimizer.step` and `zero_grad` add host work per call as well: each opens a profiler annotation
(`record_function`, two operator calls even when no profiler runs) and `step` loops over the step hooks, about 8 us
each on this project's 2-core CPU for a small model, a step of a 2048-wide MLP being about 1,100 us. On the direct
path the engine calls the optimizer's own step function and sets the gradients to None itself, and takes torch's full
call whenever that could make a difference: a profiler running, a step hook registered (global or on the optimizer),
or `step` replaced on the optimizer by anything but the learning-rate scheduler's call tracker once it has seen a
call (see `lean_optimizer_calls`). Both train bit for bit the same (tests/test_stepping.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.optim.optimizer as torch_optimizer
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
            self.step, self.zero_grad = lean_optimizer_calls(raw) or (raw.step, raw.zero_grad)
        else:
            self.backward = accelerator.backward
            self.step = optimizer.step
            self.zero_grad = optimizer.zero_grad

    def step_was_skipped(self) -> bool:
        """True when the gradient scaler skipped the step (inf/nan gradients in fp16): never on the direct path."""
        return not self.direct and self.accelerator.optimizer_step_was_skipped


def lean_optimizer_calls(optimizer: torch.optim.Optimizer) -> tuple[Callable[[], Any], Callable[[], None]] | None:
    """`step()` and `zero_grad()` (gradients set to None) for a torch optimizer, without torch's per-call profiler
    annotation and hook loop when neither can matter; torch's own calls otherwise, decided on every call. None when
    this torch does not expose what the decision needs: the caller then uses the optimizer's methods."""
    kind = type(optimizer)
    unhooked = getattr(kind.step, "__wrapped__", None)  # the step function inside torch's profiling wrapper
    global_pre = getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
    global_post = getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    if not getattr(kind.step, "hooked", False) or unhooked is None or global_pre is None or global_post is None:
        return None
    profiling = torch.autograd._profiler_enabled
    own = optimizer.__dict__  # `step` or `zero_grad` set on the instance: someone wraps it, so it is called

    def step() -> Any:
        replaced = own.get("step")
        # The LR scheduler replaces `step` with a tracker that only notes a call was made (for a warning): once it has
        # noted one, skipping it changes nothing. Any other replacement is someone's wrapper, and runs.
        if replaced is not None and not (getattr(replaced, "_wrapped_by_lr_sched", False) and own.get("_opt_called")):
            return optimizer.step()
        hooks = optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks or global_pre or global_post
        if hooks or profiling():
            return optimizer.step()
        return unhooked(optimizer)

    def zero_grad() -> None:
        if profiling() or "zero_grad" in own:
            optimizer.zero_grad()
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None

    return step, zero_grad


def _scaled_backward(accumulation: int):
    def backward(loss: torch.Tensor) -> None:
        # the same as Accelerate: each micro-batch contributes its share of the accumulated gradient
        (loss / accumulation).backward()

    return backward
