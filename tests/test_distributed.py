"""Two real processes through `accelerate launch` (gloo on CPU)."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import ROOT, launch_command, launch_env

RECIPE = """
name = "dist"
model = {{ _component_ = "mlp", in_features = 16, hidden = [32], out_features = 4 }}
loss = "cross_entropy"
optim = {{ _component_ = "sgd", lr = 0.05 }}
[metrics]
accuracy = "accuracy"
[data.train]
dataset = {{ _component_ = "synthetic_classification", samples = 128 }}
batch_size = {batch}
shuffle = false
[data.val]
dataset = {{ _component_ = "synthetic_classification", samples = 101, seed = 1 }}
batch_size = 8
[trainer]
steps = 8
log_every = 1
eval_every = 4
device = "{device}"
"""


def launch(tmp_path, name, processes, batch, device="cpu"):
    recipe = tmp_path / f"{name}.toml"
    recipe.write_text(RECIPE.format(batch=batch, device=device))
    out = tmp_path / name
    cmd = launch_command(processes, "run", str(recipe), "--out", str(out))
    res = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    return res, out


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    # 2 ranks x batch 8 see, step by step, the same 16 samples as 1 rank x batch 16 (unshuffled), so losses agree
    one, out1 = launch(tmp_path, "one", 1, 16)
    two, out2 = launch(tmp_path, "two", 2, 8)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((o / "summary.json").read_text()) for o in (out1, out2))
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    train1 = [r["train/loss"] for r in records(out1) if "train/loss" in r]
    train2 = [r["train/loss"] for r in records(out2) if "train/loss" in r]
    assert len(train1) == len(train2) == 8
    assert train1 == pytest.approx(train2, rel=1e-4)
    # 101 validation samples do not split evenly over 2 ranks: duplicates must not be counted
    for key in ("val/loss", "val/accuracy"):
        assert s1["final"][key] == pytest.approx(s2["final"][key], rel=1e-4)
    # only rank 0 writes files: one line per record, no duplicates
    steps = [r["step"] for r in records(out2) if "train/loss" in r]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_rank_zero_of_one_misconfiguration_is_refused(tmp_path):
    res, out = launch(tmp_path, "bad", 2, 8, device="auto")
    assert res.returncode != 0
    assert "believes it is rank 0 of 1" in res.stderr and 'trainer.device = "cpu"' in res.stderr
    assert not (out / "summary.json").exists()


RANK_ONE_SEES_AN_OLDER_CHECKPOINT = """
import os
import sys
from pathlib import Path

import accelengine.restart

if os.environ["RANK"] == "1":  # as a read error on the newest checkpoint would make it: the next one is the latest
    accelengine.restart.find_latest = lambda root: Path(root) / "step-00000004"

from accelengine.cli import main

sys.exit(main())
"""


@pytest.mark.slow
def test_every_rank_resumes_from_the_checkpoint_rank_zero_chose(tmp_path):
    """Each process picks the checkpoint to continue from on its own, before they can talk; if one picks another
    (here rank 1 is made to see step 4 as the newest, step 8 being the real one), it follows rank 0, with a warning,
    instead of resuming at a different step and leaving the processes waiting for each other."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(batch=8, device="cpu") + "[checkpoint]\nevery_steps = 4\n")
    out = tmp_path / "run"
    first = subprocess.run(
        launch_command(2, "run", str(recipe), "--out", str(out)),
        cwd=ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert {"step-00000004", "step-00000008"} <= {p.name for p in (out / "checkpoints").iterdir()}
    wrapper = tmp_path / "rank_one_sees_older.py"
    wrapper.write_text(RANK_ONE_SEES_AN_OLDER_CHECKPOINT)
    command = [*launch_command(2)[:-2], str(wrapper), "run", str(recipe), "--out", str(out)]
    command += ["--set", "trainer.steps=12"]
    second = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    said = second.stdout + second.stderr  # a warning of rank 1: on its console, prefixed with its rank
    assert "[rank 1] rank 1 would have continued from" in said and "step-00000008" in said, said[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 12
    steps = [r["step"] for r in records(out) if "train/loss" in r]
    assert steps == list(range(1, 13))  # 9..12 continued the first run's 1..8 once, not twice from step 5
