"""TimeLimit: a clean stop after the wall-time budget."""

from __future__ import annotations

import time

import pytest

from accelengine import Callback
from accelengine.callbacks import TimeLimit
from accelengine.callbacks.time_limit import parse_duration

from .helpers import tiny_engine


class Slow(Callback):
    def after_fit_step(self, engine):
        time.sleep(0.02)


def test_stops_after_the_limit():
    summary = tiny_engine(callbacks=[Slow(), TimeLimit(0.05)], steps=1000).fit()
    assert summary["status"] == "stopped"
    assert 2 <= summary["steps"] <= 10
    assert summary["stop_reason"] == f"time limit: 0.05 s of training reached at step {summary['steps']}"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("45m", 2700.0),
        ("1h30m", 5400.0),
        ("2d", 172800.0),
        ("01:30:00", 5400.0),
        ("3:20", 200.0),
    ],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "1x", 0, -5, "", True])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)
