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
