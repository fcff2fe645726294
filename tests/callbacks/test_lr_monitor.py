"""LearningRateMonitor: every parameter group's learning rate (and momentum) in the training record."""

from __future__ import annotations

import json

import pytest
import torch

from accelengine.callbacks import LearningRateMonitor

from .helpers import Recorder, tiny_engine


def two_groups(params):
    params = list(params)
    return torch.optim.SGD(
        [{"params": params[:2], "name": "first"}, {"params": params[2:], "lr": 0.01}], lr=0.1, momentum=0.9
    )


def test_every_group_at_log_steps(tmp_path):
    rec = Recorder()
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)  # noqa: E731
    tiny_engine(
        callbacks=[LearningRateMonitor(momentum=True), rec], optimizer=two_groups, scheduler=scheduler, out_dir=tmp_path
    ).fit()
    # the rate the next step will use, as `train/lr` reports it: halved after steps 3 and 6
    assert rec.values("lr/first") == [(2, 0.1), (4, 0.05), (6, 0.025), (8, 0.025)]
    assert rec.values("lr/1") == [(2, 0.01), (4, 0.005), (6, 0.0025), (8, 0.0025)]
    assert rec.values("momentum/first") == [(s, 0.9) for s in (2, 4, 6, 8)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "train/loss" in r]
    assert all("lr/first" in r and "lr/1" in r for r in train)  # one record per log step, not a second one


def test_own_cadence():
    rec = Recorder()
    tiny_engine(callbacks=[LearningRateMonitor(every_n_steps=4), rec]).fit()
    assert [s for s, _ in rec.values("lr/0")] == [4, 8]


def test_bad_cadence():
    with pytest.raises(ValueError, match="every_n_steps"):
        LearningRateMonitor(every_n_steps=0)


def test_a_cadence_other_than_log_every_is_logged_at_its_own_steps():
    from accelengine.callbacks import GradNormMonitor

    rec = Recorder()
    lrs = []

    class Rates(LearningRateMonitor):  # the learning rate the optimizer stepped with, at each step
        def before_optimizer_step(self, engine):
            lrs.append(engine.optimizer.param_groups[0]["lr"])

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))

    monitors = [LearningRateMonitor(every_n_steps=3), GradNormMonitor(every_n_steps=3), Rates(every_n_steps=99), rec]
    tiny_engine(callbacks=monitors, steps=8, log_every=4, scheduler=schedule).fit()
    assert [s for s, _ in rec.values("lr/0")] == [3, 6]
    assert [s for s, _ in rec.values("train/grad_norm")] == [3, 6]
    assert [s for s, _ in rec.values("train/loss")] == [4, 8]
    # each value is the one at its own step: the rate after step s is the one step s + 1 uses
    assert rec.values("lr/0") == [(3, pytest.approx(lrs[3])), (6, pytest.approx(lrs[6]))]
