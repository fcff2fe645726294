"""The command line and the run directory, through real processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from accelengine.recipe import load_recipe

from .conftest import ROOT, launch_command, launch_env, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))


def _shipped_run_recipes():
    return [r for r in RECIPES if "sweep" not in r.stem]


@pytest.mark.parametrize("recipe", _shipped_run_recipes(), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    load_recipe(recipe)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_opens_with_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# accelengine ") and recipe.name in first


def test_validate_ok_and_print():
    res = run_cli("validate", "recipes/digits.toml", "--print")
    assert res.returncode == 0, res.stderr
    assert "[trainer]" in res.stdout and "log_every = 20" in res.stdout


def test_recipe_mistake_is_one_message_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "recipes/digits.toml").read_text().replace("lr = 2e-3", "lerning_rate = 2e-3"))
    for command in ("run", "validate"):
        res = (
            run_cli(command, str(bad), "--out", str(tmp_path / "out"))
            if command == "run"
            else run_cli(command, str(bad))
        )
        assert res.returncode == 2
        assert (
            "Traceback" not in res.stderr and "optim.lerning_rate" in res.stderr and "did you mean `lr`?" in res.stderr
        )
    assert not (tmp_path / "out").exists()


def test_bad_toml_reports_file_line_column(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[trainer\nepochs = 1\n")
    res = run_cli("validate", str(bad))
    assert res.returncode == 2 and f"{bad}:2:" in res.stderr and "Traceback" not in res.stderr


def test_missing_recipe_file(tmp_path):
    res = run_cli("run", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_override_errors_are_recipe_errors(tmp_path):
    res = run_cli("validate", "recipes/digits.toml", "--set", "trainer.epochs=many")
    assert res.returncode == 2 and "trainer.epochs" in res.stderr


@pytest.mark.slow
def test_digits_trains_end_to_end(tmp_path):
    """The flagship recipe, shortened: real digits, real files in the run directory."""
    out = tmp_path / "run"
    res = run_cli("run", "recipes/digits.toml", "--out", str(out), "--set", "trainer.epochs=8")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("recipe.toml", "env.json", "metrics.jsonl", "log.txt", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 8 and summary["seed"] == 0
    assert summary["final"]["test/accuracy"] >= 0.95
    env = json.loads((out / "env.json").read_text())
    assert {"python", "torch", "accelerate", "accelengine"} <= set(env["versions"]) and env["world_size"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "epoch" in r for r in records)
    assert any("train/loss" in r for r in records) and any("val/accuracy" in r for r in records)
    assert "test/accuracy" in (out / "log.txt").read_text()
    # the resolved recipe runs again as is, and says how
    resolved = (out / "recipe.toml").read_text()
    assert "epochs = 8" in resolved and resolved.startswith("# resolved recipe")
    assert load_recipe(out / "recipe.toml").trainer.epochs == 8


def test_default_run_directory(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    res = run_cli("run", str(recipe), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


TINY = """
model = { _component_ = "mlp", in_features = 16, hidden = [8], out_features = 4 }
loss = "cross_entropy"
optim = { _component_ = "sgd", lr = 0.1 }
[data.train]
dataset = { _component_ = "synthetic_classification", samples = 64 }
[trainer]
steps = 3
device = "cpu"
"""


@pytest.mark.slow
def test_processes_that_start_seconds_apart_share_one_default_run_directory(tmp_path):
    # the default directory is named after the clock: rank 1, slowed down as it reads the recipe, reads another second
    (tmp_path / "late.py").write_text(
        "import os\nimport time\n\nimport torch\n\nif os.environ.get('RANK') == '1':\n    time.sleep(1.5)\n\n\n"
        "def make():\n    return torch.nn.Linear(16, 4)\n"
    )
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        TINY.replace('{ _component_ = "mlp", in_features = 16, hidden = [8], out_features = 4 }', '"late.make"')
    )
    res = subprocess.run(
        launch_command(2, "run", str(recipe)),
        cwd=tmp_path,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert (run_dir / "checkpoints" / "step-00000003").is_dir()


def test_sweep_recipe_is_refused_by_run(tmp_path):
    recipe = tmp_path / "s.toml"
    recipe.write_text(TINY.replace("lr = 0.1", "lr_ = [0.1, 0.2]"))
    res = run_cli("run", str(recipe))
    assert res.returncode == 2 and "accelengine sweep" in res.stderr


def test_failed_run_exits_1_and_records_failure(tmp_path):
    (tmp_path / "broken.py").write_text(
        "import torch\nclass Broken(torch.nn.Linear):\n    def __init__(self):\n        super().__init__(16, 4)\n"
        "    def forward(self, x):\n        raise RuntimeError('model exploded')\n"
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        TINY.replace('{ _component_ = "mlp", in_features = 16, hidden = [8], out_features = 4 }', '"broken.Broken"')
    )
    res = run_cli("run", str(recipe), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert res.returncode == 1 and "model exploded" in res.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed" and "model exploded" in summary["stop_reason"]


def test_python_api_run(tmp_path):
    import accelengine

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    summary = accelengine.run(recipe, ["trainer.steps=2"], out=tmp_path / "out")
    assert summary["steps"] == 2 and Path(tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ('optim.lr="fast"', "`optim`: building `adamw` failed"),
        ("optim.lr=-1", "`optim`: building `adamw` failed"),
        ('model.hidden="abc"', "`model`: building `mlp` failed"),
        ('engine={_component_ = "engine", resume_from = "x"}', "engine.resume_from"),
        ('model="builtins.dict"', "not a torch.nn.Module"),
    ],
)
def test_a_value_a_component_refuses_is_one_message_naming_the_key(tmp_path, override, named):
    res = run_cli(
        "run", "recipes/digits.toml", "--out", str(tmp_path / "out"), "--set", "trainer.epochs=1", "--set", override
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and named in res.stderr, res.stderr


def test_out_naming_a_file_is_a_message(tmp_path):
    (tmp_path / "afile").write_text("x")
    res = run_cli("run", "recipes/digits.toml", "--out", str(tmp_path / "afile"))
    assert res.returncode == 2 and "is a file, not a directory" in res.stderr and "Traceback" not in res.stderr


def test_a_run_directorys_recipe_runs_again_with_the_modules_beside_the_original(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "beside_model.py").write_text("import torch\n\n\ndef make():\n    return torch.nn.Linear(64, 10)\n")
    recipe = (ROOT / "recipes/digits.toml").read_text()
    start = recipe.index("model = ")
    end = recipe.index("\n", start)
    (project / "user.toml").write_text(recipe[:start] + 'model = "beside_model.make"' + recipe[end:])
    first, second = tmp_path / "first", tmp_path / "second"
    quick = ["--set", "trainer.epochs=1", "--set", 'log.copy_code=["*.py"]']
    assert run_cli("run", str(project / "user.toml"), "--out", str(first), *quick).returncode == 0
    assert json.loads((first / "env.json").read_text())["recipe_dir"] == str(project.resolve())
    res = run_cli("run", str(first / "recipe.toml"), "--out", str(second), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (second / "code" / "beside_model.py").is_file()  # the code snapshot globs the original folder too


def test_a_recipe_saved_with_a_byte_order_mark_runs_like_any_other(tmp_path):
    recipe = tmp_path / "windows.toml"
    recipe.write_bytes(b"\xef\xbb\xbf" + (ROOT / "recipes/digits.toml").read_bytes())
    res = run_cli("validate", str(recipe))
    assert res.returncode == 0 and f"{recipe}: ok" in res.stdout, res.stderr


def test_a_syntax_error_in_the_recipes_own_module_is_one_message_exit_2(tmp_path):
    (tmp_path / "mymodels.py").write_text("import torch\n\n\ndef Net(:\n    return torch.nn.Linear(64, 10)\n")
    recipe = (ROOT / "recipes/digits.toml").read_text()
    start = recipe.index("model = ")
    user = tmp_path / "user.toml"
    user.write_text(recipe[:start] + 'model = "mymodels.Net"' + recipe[recipe.index("\n", start) :])
    for args in (["validate", str(user)], ["run", str(user), "--out", str(tmp_path / "out")]):
        res = run_cli(*args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.count("error:") == 1 and "`model._component_`" in res.stderr, res.stderr
        assert f"SyntaxError: invalid syntax at {tmp_path / 'mymodels.py'}, line 4: `def Net(:`" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_broken_override_value_is_one_message_exit_2_not_a_string_for_the_optimizer():
    res = run_cli("validate", "recipes/digits.toml", "--set", "optim.betas=[0.9, 0.99", "--set", "optim.lr=")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "2 problems" in res.stderr and "`optim.betas`: bad override" in res.stderr, res.stderr
    assert "`optim.lr`: bad override `optim.lr=`: no value after `=`" in res.stderr, res.stderr
