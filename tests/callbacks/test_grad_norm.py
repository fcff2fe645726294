"""GradNormMonitor: the norm the optimizer sees, read back only with the log step's losses."""

from __future__ import annotations

import math

import pytest
import torch

from accelengine import Callback
from accelengine.callbacks import GradNormMonitor

from .helpers import Recorder, tiny_engine


class TrueNorm(Callback):
    """Computes the gradient norm independently, in the same hook (registered after the monitor)."""

    def __init__(self):
        super().__init__()
        self.norms: dict[int, float] = {}

    def before_optimizer_step(self, engine):
        grads = [p.grad.flatten() for p in engine.model.parameters() if p.grad is not None]
        self.norms[engine.state.step + 1] = float(torch.cat(grads).norm())


def test_norm_matches_a_direct_computation():
    rec, truth = Recorder(), TrueNorm()
    tiny_engine(callbacks=[GradNormMonitor(), truth, rec]).fit()
    logged = rec.values("train/grad_norm")
    assert [s for s, _ in logged] == [2, 4, 6, 8]
    for step, value in logged:
        assert value == pytest.approx(truth.norms[step], rel=1e-5)


def test_after_clipping_and_per_module():
    rec = Recorder()
    tiny_engine(callbacks=[GradNormMonitor(per_module=True), rec], max_grad_norm=0.05, lr=1.0).fit()
    norms = [v for _, v in rec.values("train/grad_norm")]
    assert all(v <= 0.05 + 1e-6 for v in norms)
    parts = {k for r in rec.records for k in r if k.startswith("grad_norm/")}
    assert parts == {"grad_norm/0", "grad_norm/2"}  # the MLP's linear layers (the activation has no parameters)
    for r in rec.records:
        if "train/grad_norm" in r:
            total = math.sqrt(sum(r[k] ** 2 for k in parts))
            assert total == pytest.approx(r["train/grad_norm"], rel=1e-5)


def test_values_stay_on_the_device_until_the_log_step():
    monitor = GradNormMonitor(every_n_steps=1)
    pending = []

    class Peek(Callback):
        def fit_step(self, engine):
            pending.append(dict(engine._log_next))

    tiny_engine(callbacks=[monitor, Peek()], log_every=4, steps=4).fit()
    assert all(isinstance(v, torch.Tensor) for p in pending for v in p.values())
    assert len(pending[2]["train/grad_norm"].shape) == 0
