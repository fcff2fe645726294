"""Gradient norm, measured where the optimizer sees the gradients."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from accelengine.callbacks.base import Callback

if TYPE_CHECKING:
    from accelengine.engine import Engine


class GradNormMonitor(Callback):
    """Adds `train/grad_norm` (the total norm over all parameters) to the training record.

    It runs in `before_optimizer_step`, so it measures the gradients the optimizer is about to use: after the
    all-reduce, after unscaling (fp16) and after clipping (with `trainer.max_grad_norm`, a norm above the limit reads
    as the limit). The norm stays a device tensor; the engine reads it back together with the losses, in the one
    synchronisation of a log step. With FSDP/DeepSpeed sharding each process sees its shard only.

    Args:
        every_n_steps: optimizer steps between measurements; default the trainer's `log_every`.
        norm_type: the p of the p-norm (2.0: Euclidean; `inf`: largest absolute value).
        per_module: also record `grad_norm/<module>` for each top-level module.
    """

    def __init__(self, every_n_steps: int | None = None, norm_type: float = 2.0, per_module: bool = False) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"GradNormMonitor: every_n_steps must be at least 1, got {every_n_steps}")
        self.every = every_n_steps
        self.norm_type = float(norm_type)
        self.per_module = per_module

    def before_optimizer_step(self, engine: Engine) -> None:
        # `state.step` does not count the step being made yet.
        if (engine.state.step + 1) % (self.every or engine.config.log_every):
            return
        acc = engine.accelerator
        if acc.scaler is not None and engine.config.max_grad_norm is None:
            acc.unscale_gradients()  # clipping unscales already; otherwise the norm would carry the loss scale
        groups = {"train/grad_norm": list(engine.model.parameters())}
        if self.per_module:
            for name, child in engine.unwrapped_model().named_children():
                groups[f"grad_norm/{name}"] = list(child.parameters())
        values = {}
        for key, params in groups.items():
            norm = self.norm(params)
            if norm is not None:
                values[key] = norm
        engine.log_next(values)

    def norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
        """The total norm of the parameters' gradients, on their device (None when none has a gradient)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        per_tensor = torch._foreach_norm(grads, self.norm_type)
        return torch.linalg.vector_norm(
            torch.stack([n.float().to(grads[0].device) for n in per_tensor]), self.norm_type
        )
