"""Run modes over checkpoints: evaluate, export, fine-tune, and their error paths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from accelengine import EngineError, evaluate, export_weights, run
from accelengine.checkpoint import CheckpointManager, find_latest, read_checkpoint
from accelengine.restart import capture, plan_resume

from .conftest import run_cli

RECIPE = """
model = { _component_ = "mlp", in_features = 16, hidden = [8], out_features = 4 }
loss = "cross_entropy"
optim = { _component_ = "sgd", lr = 0.1 }
[[callbacks]]
_component_ = "ema"
momentum = 0.9
[metrics]
accuracy = "accuracy"
[data.train]
dataset = { _component_ = "synthetic_classification", samples = 64 }
[data.val]
dataset = { _component_ = "synthetic_classification", samples = 32, seed = 1 }
[trainer]
steps = 6
device = "cpu"
[log]
trackers = []
"""


@pytest.fixture
def trained(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    summary = run(recipe, out=tmp_path / "run")
    return recipe, tmp_path / "run", summary


def test_evaluate_reproduces_the_checkpoint_metrics(trained, tmp_path):
    recipe, run_dir, summary = trained
    result = evaluate(recipe, run_dir, out=tmp_path / "eval")
    assert result["steps"] == 0 and result["final"] == summary["final"]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["final"] == summary["final"]


def test_eval_cli_prints_metrics_and_writes_beside_the_run(trained):
    recipe, run_dir, summary = trained
    res = run_cli("eval", str(recipe), "--checkpoint", str(run_dir))
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout[res.stdout.index("{") :]) == pytest.approx(summary["final"])
    (eval_dir,) = run_dir.glob("eval-*")
    assert (eval_dir / "summary.json").is_file()


def test_export_and_ema_export(trained, tmp_path):
    _, run_dir, _ = trained
    ckpt = read_checkpoint(find_latest(run_dir / "checkpoints"))
    plain = load_file(export_weights(run_dir, tmp_path / "w.safetensors"))
    assert plain.keys() == ckpt.parts["model"].keys()
    assert all(torch.equal(plain[k], ckpt.parts["model"][k]) for k in plain)
    ema = load_file(export_weights(run_dir, tmp_path / "ema.safetensors", ema=True))
    averaged = ckpt.parts["callbacks"]["ema"]["params"]
    assert all(torch.equal(ema[k], averaged[k]) for k in averaged)
    assert any(not torch.equal(ema[k], plain[k]) for k in averaged)  # the averages are not the trained weights


def test_evaluate_ema_weights_and_leaves_no_scratch_file(trained, tmp_path, monkeypatch):
    import tempfile

    recipe, run_dir, summary = trained
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    result = evaluate(recipe, run_dir, out=tmp_path / "eval-ema", ema=True)
    assert set(result["final"]) == set(summary["final"]) and result["final"] != summary["final"]
    assert not any((tmp_path / "scratch").iterdir())


def test_export_ema_without_ema_is_a_clear_error(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace('[[callbacks]]\n_component_ = "ema"\nmomentum = 0.9\n', ""))
    run(recipe, out=tmp_path / "run")
    with pytest.raises(EngineError, match="no EMA weights"):
        export_weights(tmp_path / "run", tmp_path / "w.safetensors", ema=True)


def test_evaluate_needs_an_evaluation_set(trained, tmp_path):
    _, run_dir, _ = trained
    recipe = tmp_path / "train_only.toml"
    recipe.write_text(
        RECIPE.replace(
            '[data.val]\ndataset = { _component_ = "synthetic_classification", samples = 32, seed = 1 }\n', ""
        )
    )
    res = run_cli("eval", str(recipe), "--checkpoint", str(run_dir))
    assert res.returncode == 2 and "no evaluation sets" in res.stderr and "Traceback" not in res.stderr


def test_resume_from_a_path_without_checkpoint(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    res = run_cli("run", str(recipe), "--resume", str(tmp_path / "nowhere"))
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_init_from_a_bad_source(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    (tmp_path / "notes.txt").write_text("not weights")
    res = run_cli("run", str(recipe), "--set", f'checkpoint.init_from="{tmp_path / "notes.txt"}"')
    assert res.returncode == 2 and "init_from" in res.stderr and "Traceback" not in res.stderr


def test_resume_with_another_number_of_processes_is_refused(trained, tmp_path):
    from accelengine.build import build_engine
    from accelengine.recipe import load_recipe

    recipe, _, _ = trained
    engine = build_engine(load_recipe(recipe), tmp_path / "src")
    engine.setup()
    shared, per_rank, meta = capture(engine)
    meta["world_size"] = 2  # as if written by a 2-process run
    CheckpointManager(tmp_path / "two" / "checkpoints").save(
        "step-00000000", shared=shared, per_rank=per_rank, meta=meta
    )
    resumed = build_engine(load_recipe(recipe), tmp_path / "two", resume_from=plan_resume(tmp_path / "two", "auto"))
    with pytest.raises(EngineError, match=r"2 process\(es\).*same number of processes"):
        resumed.setup()


def test_export_to_a_directory_or_below_a_file_is_one_message(trained, tmp_path, capsys):
    from accelengine.cli import main

    _, run_dir, _ = trained
    (tmp_path / "afile").write_text("x")
    for out, named in [(tmp_path, "is a directory"), (tmp_path / "afile" / "w.safetensors", "cannot write")]:
        assert main(["export", str(run_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert named in err and str(out) in err


def test_out_below_a_file_is_one_message_before_anything_runs(trained, tmp_path, capsys):
    from accelengine.cli import main

    recipe, run_dir, _ = trained
    (tmp_path / "afile").write_text("x")
    below = tmp_path / "afile" / "run"
    for args in (["run", str(recipe)], ["eval", str(recipe), "--checkpoint", str(run_dir)]):
        assert main([*args, "--out", str(below)]) == 2
        assert f"{tmp_path / 'afile'} is a file, not a directory" in capsys.readouterr().err
