"""TimeLimit: a clean stop after the wall-time budget."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from accelengine import Callback
from accelengine.callbacks import TimeLimit
from accelengine.callbacks.time_limit import parse_duration

from ..conftest import ROOT, launch_command, launch_env
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


SKEWED_CLOCKS = """
import sys
import time
from pathlib import Path

import torch

from accelengine import MLP, Callback, DataConfig, Engine, LogConfig, TrainerConfig
from accelengine.callbacks import TimeLimit
from accelengine.examples.synthetic import classification


class Skew(Callback):
    \"\"\"After the time limit's before_fit: rank 1 started an hour later than rank 0 (its limit is far off).\"\"\"

    def before_fit(self, engine):
        if engine.accelerator.process_index == 1:
            limit._deadline += 3600

    def after_fit_step(self, engine):
        time.sleep(0.01)


limit = TimeLimit(0.3)
engine = Engine(
    model=MLP(8, 3, hidden=[16]),
    data={"train": classification(samples=64, features=8, classes=3)},
    loss=torch.nn.CrossEntropyLoss(),
    optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    callbacks=[limit, Skew()],
    config=TrainerConfig(device="cpu", steps=100_000, log_every=5),
    data_config=DataConfig(batch_size=8),
    log_config=LogConfig(progress=False, console=False, summary=False),
)
summary = engine.fit()
rank = engine.accelerator.process_index
Path(sys.argv[1], f"rank{rank}.txt").write_text(f"{summary['status']} {summary['steps']}")
"""


@pytest.mark.slow
def test_every_process_stops_at_the_same_step(tmp_path):
    # each process reads its own clock: rank 0 reaches the limit, rank 1 (an hour behind) not; unless they agree,
    # rank 0 stops while rank 1 waits for it in the next step's all-reduce, and the run hangs
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED_CLOCKS)
    command = [*launch_command(2)[:-2], str(script), str(tmp_path)]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        out, err = proc.communicate()
        pytest.fail(f"the processes did not stop together (hung): {out[-2000:]}")
    assert proc.returncode == 0, err[-3000:]
    ends = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert ends[0][0] == ends[1][0] == "stopped"
    assert ends[0][1] == ends[1][1]  # the same step
