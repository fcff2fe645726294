"""ParamTable: trainable / frozen / buffer counts per top-level module, printed and in the summary."""

from __future__ import annotations

import torch
from torch import nn

from accelengine import LogConfig
from accelengine.callbacks.param_table import count_parameters, format_table, human

from .helpers import tiny_engine


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
        self.head = nn.Linear(16, 3)
        self.tied = self.head  # shared: counted once
        self.scale = nn.Parameter(torch.ones(1))
        self.backbone[0].requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x)) * self.scale


def test_counts():
    rows = count_parameters(Net())
    assert rows == [
        ("backbone", "Sequential", 32, 144, 33),  # BatchNorm: weight+bias trainable, running stats + count buffers
        ("head", "Linear", 51, 0, 0),
        ("(own)", "Net", 1, 0, 0),
    ]
    text = format_table(rows)
    assert text.splitlines()[0].split() == ["module", "type", "trainable", "frozen", "buffers"]
    assert text.splitlines()[-1].split() == ["total", "84", "144", "33"]
    assert human(1_234_567) == "1.2M" and human(999) == "999"


def test_printed_at_start_and_in_the_summary(capsys):
    engine = tiny_engine(steps=1, log=LogConfig(progress=False, console=False, summary=False))
    engine.model = Net()
    summary = engine.fit()
    out = capsys.readouterr().out
    assert "backbone  Sequential" in out and "total" in out
    assert summary["params"] == {"trainable": 84, "frozen": 144, "buffers": 33}


def test_switched_off(capsys):
    tiny_engine(steps=1, log=LogConfig(progress=False, param_table=False)).fit()
    assert "trainable" not in capsys.readouterr().out


def test_lazy_modules_are_not_counted_until_initialised(capsys):
    # their tensors have no size before the first forward: the table counts the others and says so; the run trains
    engine = tiny_engine(steps=2, log=LogConfig(progress=False, console=False, summary=False))
    engine.model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))
    summary = engine.fit()
    assert summary["status"] == "completed"
    assert summary["params"] == {"trainable": 51, "frozen": 0, "buffers": 0, "uninitialized_tensors": 2}
    assert "not counted: 2 tensors of lazy modules" in capsys.readouterr().out
    assert count_parameters(engine.model)[0] == ("0", "Linear", 144, 0, 0)  # initialised by training
