"""Sessions and sweeps: expansion of grid axes and random search, validation, and real sessions run through the CLI,
in parallel, resumed, and through submitit's local executor."""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accelengine.cli import main
from accelengine.errors import EngineError, RecipeError
from accelengine.recipe import load_recipe, parse_toml, validate
from accelengine.sweep import expand, plan, run_session
from accelengine.sweep.expand import validate_experiments
from accelengine.sweep.launch import experiment_command, plan_slots, with_free_port
from accelengine.sweep.results import best_of, mark_best, new_rows, read_row
from accelengine.sweep.session import load_session

from .conftest import ROOT, run_cli

# A session small enough that one experiment is mostly Python start-up: 5 SGD steps of a tiny MLP.
TINY = """
name = "tiny"
model = { _component_ = "mlp", in_features = 8, hidden = [8], out_features = 3 }
loss = "cross_entropy"
optim = { _component_ = "sgd", lr = 0.5 }

[metrics]
accuracy = "accuracy"

[data]
batch_size = 16

[data.train]
dataset = { _component_ = "synthetic_classification", samples = 64, features = 8, classes = 3 }

[data.val]
dataset = { _component_ = "synthetic_classification", samples = 32, features = 8, classes = 3, seed = 1 }

[trainer]
steps = 5
eval_every = 5
device = "cpu"

[sweep]
metric = "val/accuracy"
"""


def session(text: str = TINY, **replace: str) -> dict:
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_toml(text)


def problems_of(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        expand(data)
    return [str(p) for p in info.value.problems]


def write(tmp_path, text: str, name: str = "tiny.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def rows_of(session_dir) -> list[dict]:
    with open(session_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- grid axes ------------------------------------------------------------------------------------------------------


def test_grid_2x3_makes_six_experiments_with_the_right_values():
    data = session(**{"lr = 0.5": "lr_ = [1e-3, 1e-2, 1e-1]", "batch_size = 16": "batch_size_ = [8, 16]"})
    exps = expand(data)
    assert len(exps) == 6 and [e.index for e in exps] == list(range(6))
    # the first axis in file order varies slowest, like nested loops
    assert [(e.overrides["optim.lr"], e.overrides["data.batch_size"]) for e in exps] == [
        (1e-3, 8), (1e-3, 16), (1e-2, 8), (1e-2, 16), (1e-1, 8), (1e-1, 16),
    ]  # fmt: skip
    for e in exps:
        assert e.recipe["optim"] == {"_component_": "sgd", "lr": e.overrides["optim.lr"]}  # `lr_` is gone
        assert (
            e.recipe["data"]["batch_size"] == e.overrides["data.batch_size"] and "batch_size_" not in e.recipe["data"]
        )
        assert "sweep" not in e.recipe
    assert exps[3].name == "03-lr=0.01-batch_size=16"
    assert expand(data) == exps  # deterministic
    resolved = validate_experiments(exps)
    assert [r["optim"]["lr"] for r in resolved] == [e.overrides["optim.lr"] for e in exps]


def test_axes_at_any_depth_component_tables_and_callbacks():
    data = session(
        **{
            "hidden = [8]": "hidden_ = [[8], [16, 8]]",
            "seed = 1 }": "seed_ = [1, 2] }",  # inside the val data set's component table
            "[sweep]": '[[callbacks]]\n_component_ = "early_stopping"\nmonitor = "val/accuracy"\npatience_ = [1, 3]\n\n'
            "[sweep]",
        }
    )
    exps = expand(data)
    assert len(exps) == 8
    assert list(exps[0].overrides) == ["model.hidden", "data.val.dataset.seed", "callbacks[0].patience"]
    last = exps[-1].recipe
    assert last["model"]["hidden"] == [16, 8] and last["data"]["val"]["dataset"]["seed"] == 2
    assert last["callbacks"] == [{"_component_": "early_stopping", "monitor": "val/accuracy", "patience": 3}]
    # keys keep their place in the table, so the written recipe reads like the session
    assert list(last["model"]) == ["_component_", "in_features", "hidden", "out_features"]
    assert len(validate_experiments(exps)) == 8
    assert exps[7].name == "07-hidden=16x8-seed=2-patience=3"


def test_a_list_without_underscore_is_a_value_and_component_key_is_never_an_axis():
    data = session(**{"lr = 0.5": "lr = 0.5, betas = [0.9, 0.99]"})
    data["loss_weights"] = [1.0, 10.0]
    (only,) = expand(data)
    assert only.overrides == {} and only.name == "00"
    assert only.recipe["loss_weights"] == [1.0, 10.0] and only.recipe["optim"]["_component_"] == "sgd"


def test_a_whole_component_can_be_an_axis():
    exps = expand(
        session(**{'optim = { _component_ = "sgd", lr = 0.5 }': 'optim_ = [{_component_ = "sgd", lr = 0.5}, "adamw"]'})
    )
    assert [e.recipe["optim"] for e in exps] == [{"_component_": "sgd", "lr": 0.5}, "adamw"]
    assert [e.name for e in exps] == ["00-optim=sgd", "01-optim=adamw"]


def test_underscore_keys_that_are_not_axes_are_errors_with_a_fix():
    (msg,) = problems_of(session(**{"steps = 5": "steps_ = 5"}))
    assert msg.startswith("`trainer.steps_`:") and "needs an array" in msg and "`steps = 5`" in msg
    (msg,) = problems_of(session(**{"lr = 0.5": "lr_ = []"}))
    assert "`optim.lr_`" in msg and "empty axis" in msg
    (msg,) = problems_of(session(**{"lr = 0.5": "lr = 0.5, lr_ = [0.1]"}))
    assert "both a value and a sweep axis" in msg
    (msg,) = problems_of(
        session(**{'optim = { _component_ = "sgd", lr = 0.5 }': 'optim_ = [{_component_ = "sgd", lr_ = [1, 2]}]'})
    )
    assert "`optim_[0].lr_`" in msg and "inside the value of another axis" in msg


def test_a_value_listed_twice_in_an_axis_is_an_error_not_a_repeated_experiment():
    (msg,) = problems_of(session(**{"lr = 0.5": "lr_ = [0.1, 0.5, 0.1]"}))
    assert msg.startswith("`optim.lr_`: the value `0.1` is listed twice") and "`[sweep] seeds`" in msg
    (msg,) = problems_of(session(**{"hidden = [8]": "hidden_ = [[8], [16], [8]]"}))
    assert "the value `[8]` is listed twice" in msg
    # TOML tells an integer from a float, and so do the recipes they make
    assert [e.recipe["optim"]["lr"] for e in expand(session(**{"lr = 0.5": "lr_ = [1, 1.0]"}))] == [1, 1.0]


def test_a_session_is_not_a_recipe():
    with pytest.raises(RecipeError, match="accelengine sweep"):
        validate(session(**{"lr = 0.5": "lr_ = [0.1, 0.2]"}))


# --- random search and seeds ----------------------------------------------------------------------------------------

RANDOM = """
samples = 6
seed = 3
[sweep.params]
"optim.lr" = { log_uniform = [1e-4, 1e-1] }
"optim.momentum" = { uniform = [0.0, 0.9] }
data.batch_size = { int_range = [4, 9] }
"model.hidden" = { choice = [[8], [16, 8]] }
"""


def random_session(seed: int = 3, extra: str = "") -> dict:
    return session(
        **{
            '[sweep]\nmetric = "val/accuracy"': f'[sweep]\nmetric = "val/accuracy"\n{extra}'
            + RANDOM.replace("seed = 3", f"seed = {seed}")
        }
    )


def test_random_search_is_reproducible_from_its_seed_and_within_its_distributions():
    first, again, other = expand(random_session(3)), expand(random_session(3)), expand(random_session(4))
    assert len(first) == 6 and [e.overrides for e in first] == [e.overrides for e in again]
    assert [e.overrides for e in first] != [e.overrides for e in other]
    for e in first:
        o = e.overrides
        assert list(o) == ["optim.lr", "optim.momentum", "data.batch_size", "model.hidden"]  # nested table == quoted
        assert 1e-4 <= o["optim.lr"] <= 1e-1 and 0.0 <= o["optim.momentum"] <= 0.9
        assert isinstance(o["data.batch_size"], int) and 4 <= o["data.batch_size"] <= 9
        assert o["model.hidden"] in ([8], [16, 8])
        assert e.recipe["optim"]["lr"] == o["optim.lr"] and e.recipe["data"]["batch_size"] == o["data.batch_size"]
    assert len({e.overrides["optim.lr"] for e in first}) == 6
    validate_experiments(first)


def test_a_parameter_draws_the_same_values_whatever_else_is_sampled():
    base = [e.overrides["optim.lr"] for e in expand(random_session())]
    data = random_session()
    data["sweep"]["params"]["optim.dampening"] = {"uniform": [0.0, 0.1]}
    data["sweep"]["samples"] = 8
    assert [e.overrides["optim.lr"] for e in expand(data)][:6] == base


@settings(max_examples=40, deadline=None)
@given(
    low=st.floats(1e-6, 10.0), width=st.floats(1e-3, 100.0), ilow=st.integers(-50, 50), iwidth=st.integers(0, 20),
    seed=st.integers(0, 2**31),
)  # fmt: skip
def test_samples_stay_within_any_bounds(low, width, ilow, iwidth, seed):
    data = session()
    data["sweep"].update(
        samples=5, seed=seed,
        params={"optim.lr": {"log_uniform": [low, low + width]}, "optim.momentum": {"uniform": [-low, width]},
                "data.batch_size": {"int_range": [ilow, ilow + iwidth]}},
    )  # fmt: skip
    for e in expand(data):
        o = e.overrides
        assert low <= o["optim.lr"] <= low + width
        assert -low <= o["optim.momentum"] <= width
        assert ilow <= o["data.batch_size"] <= ilow + iwidth


def test_random_samples_combine_with_the_grid_and_seeds():
    data = random_session(extra="seeds = 3")
    data["seed"] = 10
    data["optim"]["nesterov_"] = [False, True]
    exps = expand(data)
    assert len(exps) == 6 * 2 * 3
    assert [e.overrides["seed"] for e in exps[:6]] == [10, 11, 12, 10, 11, 12]
    assert all(e.recipe["seed"] == e.overrides["seed"] for e in exps)
    # each sample is shared by its grid points and seeds
    assert (
        len({e.overrides["optim.lr"] for e in exps[:6]}) == 1
        and exps[6].overrides["optim.lr"] != exps[0].overrides["optim.lr"]
    )
    explicit = expand(session(**{"[sweep]": "[sweep]\nseeds = [0, 7, 42]"}))
    assert [e.overrides for e in explicit] == [{"seed": 0}, {"seed": 7}, {"seed": 42}]
    assert [e.name for e in explicit] == ["00-seed=0", "01-seed=7", "02-seed=42"]


CHOICE_OF_OPTIMS = '\noptim = { choice = [{ _component_ = "sgd", lr = 0.2 }, { _component_ = "adamw", lr = 0.01 }] }\n'


def test_a_table_drawn_whole_neither_hides_a_grid_axis_nor_a_key_drawn_into_it():
    data = session(**{"lr = 0.5": "lr_ = [0.1, 0.5]", "[sweep]": "[sweep]\nsamples = 2"})
    data["sweep"]["params"] = parse_toml(CHOICE_OF_OPTIMS)
    (msg,) = problems_of(data)  # every grid point would run the drawn optimizer, with its own lr
    assert msg.startswith("`sweep.params.optim`: `optim` would replace the grid axis `optim.lr`")
    # the key drawn into the table lands in it, whichever is written first
    data = session(**{"[sweep]": "[sweep]\nsamples = 3"})
    data["sweep"]["params"] = parse_toml('"optim.lr" = { uniform = [0.1, 0.2] }' + CHOICE_OF_OPTIMS)
    exps = expand(data)
    assert all(e.recipe["optim"]["lr"] == e.overrides["optim.lr"] for e in exps), [e.recipe for e in exps]
    assert list(exps[0].overrides) == ["optim.lr", "optim"]  # the table's columns keep the order of the file


def test_an_axis_in_a_random_choice_or_a_parameter_given_twice_is_reported():
    data = session(**{"[sweep]": "[sweep]\nsamples = 2"})
    data["sweep"]["params"] = parse_toml(CHOICE_OF_OPTIMS.replace("lr = 0.2", "lr_ = [0.2, 0.3]"))
    (msg,) = problems_of(data)  # not `sweep axes are for sessions` from the validation of the drawn recipe
    assert msg.startswith("`sweep.params.optim.choice[0].lr_`: a sweep axis inside a `choice` of `[sweep.params]`")
    data["sweep"]["params"] = parse_toml('"optim.lr" = { uniform = [0.1, 0.2] }\n[optim]\nlr = { uniform = [1, 2] }')
    (msg,) = problems_of(data)  # two spellings of one key: neither may silently win
    assert msg.startswith("`sweep.params.optim.lr`: `optim.lr` is given twice")


def test_sweep_table_mistakes_are_all_reported_with_their_key_path():
    data = session()
    data["sweep"].update(
        metrc="val/accuracy", mode="maximum", seeds=0, samples=2,
        params={"optim.lr": {"loguniform": [1e-4, 1e-1]}, "optim.momentum": {"uniform": [0.9, 0.1]},
                "optim.dampening": {"log_uniform": [0.0, 1.0]}, "data.batch_size": {"int_range": [1.5, 4]},
                "model.hidden": {"choice": []}, "x..y": {"uniform": [0, 1]}, "trainer.steps": [1, 2]},
        launch="--multi_gpu", slurm={"cluster": "mars"},
    )  # fmt: skip
    found = problems_of(data)
    expected = [
        "`sweep.metrc`: unknown key `sweep.metrc` (did you mean `metric`?)",
        "`sweep.seeds`: expected a count",
        "`sweep.params.optim.lr.loguniform`: unknown distribution `loguniform` (did you mean `log_uniform`?)",
        "`sweep.params.optim.momentum.uniform`: low 0.9 must be below high 0.1",
        "`sweep.params.optim.dampening.log_uniform`: a log-uniform range must be positive",
        "`sweep.params.data.batch_size.int_range`: expected two integers",
        "`sweep.params.model.hidden.choice`: expected a non-empty array",
        "`sweep.params.x..y`: `x..y` is not a key path",
        "`sweep.params.trainer.steps`: expected a table with one distribution, got an array",
        "`sweep.mode`: expected `min` or `max`",
        "`sweep.launch`: expected an array",
        "`sweep.slurm.cluster`: unknown cluster `mars`",
    ]
    assert len(found) == len(expected), found
    for want in expected:
        assert any(f.startswith(want) for f in found), (want, found)
    assert problems_of(session(**{"[sweep]": '[sweep.params]\n"optim.lr" = {uniform = [0, 1]}\n[sweep]'}))[
        0
    ].startswith("`sweep.samples`: `[sweep.params]` needs a number of random samples")
    clash = session(**{"lr = 0.5": "lr_ = [0.1]", "[sweep]": "[sweep]\nseeds = 2"})
    clash["seed_"] = [1, 2]
    clash["sweep"].update(samples=1, params={"optim.lr": {"uniform": [0, 1]}})
    found = problems_of(clash)
    assert any("`sweep.params.optim.lr`: `optim.lr` is already a grid axis" in f for f in found)
    assert any("`sweep.seeds`: `seed` is swept already" in f for f in found)


def test_every_experiment_is_validated_and_problems_name_the_experiment(tmp_path):
    text = TINY.replace("lr = 0.5", "lerning_rate = 0.5").replace("steps = 5", "steps_ = [5, 0, -1]")
    res = main(["sweep", str(write(tmp_path, text)), "--out", str(tmp_path / "out")])
    assert res == 2 and not (tmp_path / "out").exists()
    with pytest.raises(RecipeError) as info:
        validate_experiments(expand(parse_toml(text)))
    found = [str(p) for p in info.value.problems]
    assert (
        found[0].startswith("every experiment: `optim.lerning_rate`: unknown key") and "did you mean `lr`?" in found[0]
    )
    assert found[1:] == [
        "experiment 1 [trainer.steps=0]: `trainer.steps`: must be at least 1, got 0",
        "experiment 2 [trainer.steps=-1]: `trainer.steps`: must be at least 1, got -1",
    ]


# --- dry run, launch details ----------------------------------------------------------------------------------------


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path, TINY.replace("lr = 0.5", "lr_ = [0.1, 0.2]").replace("hidden = [8]", "hidden_ = [[8], [16, 8]]")
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["sweep", str(path), "--dry-run", "--set", "trainer.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "4 experiments" in out and "best by val/accuracy (max)" in out and "runs/tiny/<timestamp>" in out
    lines = out.splitlines()
    assert lines[2].split() == ["#", "experiment", "model.hidden", "optim.lr"]
    assert lines[-1].split() == ["3", "03-hidden=16x8-lr=0.2", "[16,", "8]", "0.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/ directory, nothing else


def test_shipped_session_expands_and_validates(capsys):
    assert main(["sweep", str(ROOT / "recipes/digits_sweep.toml"), "--dry-run"]) == 0
    assert "4 experiments" in capsys.readouterr().out


def test_commands_and_slots():
    cmd = experiment_command(ROOT / "r.toml", ROOT / "out", ["--multi_gpu", "--num_processes", "2"])
    assert cmd[1:] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "-m", "accelengine", "run", str(ROOT / "r.toml"), "--out", str(ROOT / "out")]  # fmt: skip
    ported = with_free_port(cmd)
    assert ported[3] == "--main_process_port" and int(ported[4]) > 0 and ported[5:] == cmd[3:]
    plain = experiment_command(ROOT / "r.toml", ROOT / "out")
    assert plain[1:4] == ["-m", "accelengine", "run"] and with_free_port(plain) == plain
    assert plan_slots(1)[0].env == {}  # one at a time: the whole machine
    slots = plan_slots(2)
    assert len(slots) == 2 and all(int(s.env["OMP_NUM_THREADS"]) >= 1 for s in slots)
    if slots[0].cpus is not None and len(slots[0].cpus) + len(slots[1].cpus) > 1:
        assert not set(slots[0].cpus) & set(slots[1].cpus)


def test_slurm_parameters_are_mapped_and_checked():
    from accelengine.sweep.slurm import executor_parameters

    table = {"cluster": "local", "partition": "gpu", "gpus_per_node": 1, "slurm_qos": "high"}
    cluster, kw = executor_parameters(table, 4, "s")
    assert cluster == "local"
    assert kw == {"name": "s", "timeout_min": 60, "slurm_array_parallelism": 4, "slurm_partition": "gpu",
                  "gpus_per_node": 1, "slurm_qos": "high"}  # fmt: skip
    with pytest.raises(RecipeError, match=r"`sweep.slurm.partiton`: unknown SLURM parameter"):
        executor_parameters({"cluster": "local", "partiton": "gpu"}, 1, "s")
    if shutil.which("sbatch") is None:
        with pytest.raises(EngineError, match="no SLURM here"):
            executor_parameters({}, 1, "s")


# --- real sessions --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_session_through_the_cli_with_a_failing_experiment(tmp_path):
    """Three experiments; the one with a negative layer width raises when its model is built."""
    path = write(tmp_path, TINY.replace("hidden = [8]", "hidden_ = [[8], [-3], [16]]"))
    out = tmp_path / "session"
    res = run_cli("sweep", str(path), "--out", str(out))
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "2/3 experiments finished, 1 failed" in res.stdout
    assert (out / "session.toml").read_text() == path.read_text()
    names = sorted(p.name for p in (out / "experiments").iterdir())
    assert names == ["00-hidden=8", "01-hidden=-3", "02-hidden=16"]
    for name, hidden in zip(names, ([8], [-3], [16]), strict=True):
        exp = out / "experiments" / name
        assert load_recipe(exp / "recipe.toml").model.kwargs["hidden"] == hidden  # re-runnable alone
    for name in ("00-hidden=8", "02-hidden=16"):
        assert json.loads((out / "experiments" / name / "summary.json").read_text())["status"] == "completed"
        assert (out / "experiments" / name / "metrics.jsonl").is_file()  # what `accelengine report` overlays
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"]
    assert "negative dimension" in rows[1]["error"] and rows[0]["error"] == rows[2]["error"] == ""
    assert rows[0]["model.hidden"] == "[8]" and rows[0]["final val/accuracy"] != ""
    best = max((rows[0], rows[2]), key=lambda r: (float(r["best val/accuracy"]), -int(r["index"])))
    assert [r["best"] for r in rows].count("yes") == 1 and best["best"] == "yes"
    md = (out / "results.md").read_text()
    assert f"**{best['experiment']}**" in md and "| **best** |" in md and "## 01-hidden=-3: failed" in md
    assert "RuntimeError" in md


@pytest.mark.slow
def test_parallel_session_then_resume_only_what_is_unfinished(tmp_path):
    path = write(tmp_path, TINY.replace("lr = 0.5", "lr_ = [0.1, 0.3, 0.5]"))
    out = tmp_path / "session"
    res = run_cli("sweep", str(path), "--out", str(out), "--parallel", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(local, 2 at a time)" in res.stdout
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["completed"] * 3 and all(r["best val/accuracy"] for r in rows)

    exps = sorted((out / "experiments").iterdir())
    kept = exps[0] / "summary.json"
    kept_mtime = kept.stat().st_mtime_ns
    (exps[1] / "summary.json").unlink()  # partial: killed before it finished
    shutil.rmtree(exps[2])  # never started
    result = run_session(path, out=out, echo=lambda line: None)
    assert result.ok and [r.status for r in result.rows] == ["completed"] * 3 and result.best is not None
    assert kept.stat().st_mtime_ns == kept_mtime and (exps[0] / "console.log").read_text().count("### ") == 1
    assert (exps[1] / "console.log").read_text().count("### ") == 2  # ran again, on its own directory
    assert (exps[2] / "summary.json").is_file()
    assert [r["status"] for r in rows_of(out)] == ["completed"] * 3

    # the same directory with a recipe that expands differently is refused, and nothing runs
    changed = write(tmp_path, TINY.replace("lr = 0.5", "lr_ = [0.1, 0.3, 0.7]"), "changed.toml")
    with pytest.raises(RecipeError, match=r"is a different session: experiment 2 was \[optim.lr=0.5\]"):
        run_session(changed, out=out, echo=lambda line: None)
    assert main(["sweep", str(changed), "--out", str(out)]) == 2
    assert kept.stat().st_mtime_ns == kept_mtime
    # a session directory stands for its own recipe: the dry run shows every experiment done, a run has nothing to do
    assert plan(out).splitlines()[-1].split()[-1] == "completed"
    assert main(["sweep", str(out)]) == 0


@pytest.mark.slow
def test_slurm_launcher_with_submitits_local_executor(tmp_path):
    text = TINY.replace("lr = 0.5", "lr_ = [0.2, 0.5]") + '\n[sweep.slurm]\ncluster = "local"\ntimeout_min = 5\n'
    out = tmp_path / "session"
    lines: list[str] = []
    result = run_session(write(tmp_path, text), out=out, launcher="slurm", echo=lines.append)
    assert result.ok, lines
    assert [r.status for r in result.rows] == ["completed", "completed"] and result.best is not None
    assert any("(job " in line for line in lines)
    assert [r["status"] for r in rows_of(out)] == ["completed", "completed"]
    assert len([p for p in (out / "slurm").iterdir() if p.name != "%j"]) == 2  # one job per experiment


@pytest.mark.slow
def test_slurm_checkpoint_stops_the_experiment_gracefully_and_resubmits_it(tmp_path):
    """What submitit does on preemption: call `checkpoint()` (in a signal handler, while the task waits on the
    experiment) and pickle what it returns for the requeued job."""
    import pickle
    import threading
    import time

    from accelengine.sweep.launch import Task, experiment_env
    from accelengine.sweep.slurm import ExperimentJob

    text = TINY.replace("steps = 5\neval_every = 5", "steps = 1000000\neval_every = 1000000\nlog_every = 5")
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    (exp_dir / "recipe.toml").write_text(text.split("[sweep]")[0])  # one experiment's recipe
    command = experiment_command(exp_dir / "recipe.toml", exp_dir)
    job = ExperimentJob(Task(0, "exp", exp_dir, command, experiment_env(tmp_path)), grace_s=30)
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(job()))
    runner.start()
    deadline = time.monotonic() + 60
    log = exp_dir / "metrics.jsonl"
    while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline:  # training, signals handled
        time.sleep(0.1)
    resubmitted = job.checkpoint()
    runner.join(10)
    summary = json.loads((exp_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and 0 < summary["steps"] < 1000000
    assert resubmitted.function is job and pickle.loads(pickle.dumps(resubmitted)).function._proc is None
    assert not runner.is_alive() and len(codes) == 1


def test_a_session_directory_resumes_with_the_modules_beside_its_original_recipe(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "beside.py").write_text(
        "import torch\n\n\ndef mlp(width):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))\n"
    )
    text = TINY.replace('{ _component_ = "mlp", in_features = 8, hidden = [8], out_features = 3 }', "")
    path = write(project, text.replace("model = ", 'model = { _component_ = "beside.mlp", width_ = [4, 8] }'))
    out = tmp_path / "session"
    assert run_session(path, out=out, echo=lambda line: None).ok
    shutil.rmtree(sorted((out / "experiments").iterdir())[1])  # never finished
    assert json.loads((out / "sweep.json").read_text())["recipe_dir"] == str(project.resolve())
    assert plan(out).splitlines()[-1].split() == ["1", "01-width=8", "8", "pending"]  # validated: module found
    result = run_session(out, echo=lambda line: None)  # `accelengine sweep DIR`
    assert result.ok and [r.status for r in result.rows] == ["completed"] * 2


def test_a_session_directory_keeps_the_name_its_recipe_file_gave_it(tmp_path, monkeypatch):
    monkeypatch.setattr("accelengine.sweep.session.run_local", lambda *args: None)  # lay the directory out, no runs
    text = TINY.replace('name = "tiny"\n', "").replace("lr = 0.5", "lr_ = [0.1, 0.5]")
    out = tmp_path / "session"
    run_session(write(tmp_path, text, "digits.toml"), out=out, echo=lambda line: None)
    run_session(out, echo=lambda line: None)  # `accelengine sweep DIR` reads its copy, `session.toml`
    assert json.loads((out / "sweep.json").read_text())["session"] == "digits"
    assert plan(out).startswith("session `digits`")
    for exp in (out / "experiments").iterdir():
        assert parse_toml((exp / "recipe.toml").read_text())["name"] == "digits"


def test_the_runs_names_can_be_an_axis(tmp_path):
    path = write(tmp_path, TINY.replace('name = "tiny"', 'name_ = ["first", "second"]'))
    table = plan(path)
    assert '"first"' in table and '"second"' in table
    resolved = load_session(path).resolved
    assert [r["name"] for r in resolved] == ["first", "second"]
    # from the command line, for a recipe that names no runs (its default name is no clash)
    unnamed = write(tmp_path, TINY.replace('name = "tiny"\n', ""), "unnamed.toml")
    assert [r["name"] for r in load_session(unnamed, ['name_=["a", "b"]']).resolved] == ["a", "b"]


# --- re-runs killed before their summary ---------------------------------------------------------------------------

# A callback for the experiments below: the first attempt fails (it writes a summary, with its evaluation), a later
# one is killed outright at the same point (out of memory, a node lost): it writes no summary.
FAIL_THEN_KILL = """
import os
import signal
from pathlib import Path

from accelengine.callbacks.base import Callback


class FailThenKill(Callback):
    def __init__(self, step: int, flag: str) -> None:
        super().__init__()
        self.step, self.flag = step, Path(flag)

    def after_fit_step(self, engine) -> None:
        if engine.state.step < self.step:
            return
        if not self.flag.exists():
            self.flag.touch()
            raise RuntimeError("the first attempt fails")
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_summary_is_stale_only_once_a_later_attempt_started(tmp_path):
    from accelengine.rundir import summary_is_stale, write_json

    summary, env = tmp_path / "summary.json", tmp_path / "env.json"

    def started(at: float) -> None:  # what every run writes as it starts
        write_json(env, {"started": datetime.datetime.fromtimestamp(at).isoformat(timespec="seconds")})
        os.utime(env, (at, at))

    now = time.time()
    started(now - 100)
    summary.write_text("{}")
    os.utime(summary, (now - 50, now - 50))
    assert not summary_is_stale(tmp_path)  # written by the attempt that started before it
    os.utime(env, (now, now))  # a copy that does not keep file times (`cp -r`) wrote env.json last
    assert not summary_is_stale(tmp_path)
    started(now)  # a later attempt started, and ended without a summary
    assert summary_is_stale(tmp_path)
    os.utime(summary, (now + 5, now + 5))  # ...or with one
    assert not summary_is_stale(tmp_path)
    env.unlink()
    assert not summary_is_stale(tmp_path)


def test_the_attempt_id_in_env_and_summary_decides_whether_a_summary_is_stale(tmp_path):
    """A real run writes the same new `attempt` id into `env.json` and `summary.json`; a later attempt's `env.json`
    (one second or one microsecond later, whatever the file times say) makes the summary an earlier attempt's."""
    from accelengine.rundir import summary_is_stale, write_json

    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY.split("[sweep]")[0])
    out = tmp_path / "run"
    assert run_cli("run", str(recipe), "--out", str(out)).returncode == 0
    env, summary = (json.loads((out / f).read_text()) for f in ("env.json", "summary.json"))
    assert len(env["attempt"]) == 32 and summary["attempt"] == env["attempt"]
    assert not summary_is_stale(out)
    write_json(out / "env.json", {**env, "attempt": "0" * 32})  # the next attempt started; its times are older
    os.utime(out / "env.json", (0, 0))
    assert summary_is_stale(out)


def test_the_error_of_an_experiment_comes_from_its_latest_attempt(tmp_path):
    from accelengine.sweep.launch import log_header
    from accelengine.sweep.results import error_from_log

    log = tmp_path / "console.log"
    with open(log, "a") as f:
        log_header(["python", "-m", "accelengine", "run"], f)
        f.write("Traceback (most recent call last):\nRuntimeError: the first attempt failed\n")
        log_header(["python", "-m", "accelengine", "run"], f)
        f.write("### not a header: the run's own output\nepoch 3 step 40  train/loss 0.1\n")
    assert error_from_log(log) == "epoch 3 step 40  train/loss 0.1"  # not the earlier attempt's exception
    log.write_text("ValueError: a log without headers\nlast line\n")
    assert error_from_log(log) == "ValueError: a log without headers"


def _evaluations(metrics) -> list[dict]:
    records = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:  # the line being written
            continue
    return [r for r in records if "val/loss" in r]


@pytest.mark.slow
def test_a_rerun_killed_before_its_summary_is_not_ranked_as_the_earlier_result(tmp_path):
    """Experiment 0 completed, was then run again for longer on its own directory (`accelengine run`) and killed
    outright: its summary.json is still the first attempt's, while its metrics.jsonl goes on with the killed one."""
    text = TINY.replace("lr = 0.5", "lr_ = [0.1, 0.5]").replace('metric = "val/accuracy"', 'metric = "val/loss"')
    path = write(tmp_path, text)
    out = tmp_path / "session"
    first = run_session(path, out=out, echo=lambda line: None)
    assert first.ok and first.best is first.rows[1]  # lr 0.5 learns more in 5 steps
    exp = out / "experiments" / "00-lr=0.1"
    earlier = (exp / "summary.json").read_text()
    time.sleep(1)  # a re-run starts after the second the earlier attempt ended in (`started` is in whole seconds)

    rerun = [sys.executable, "-m", "accelengine", "run", str(exp / "recipe.toml"), "--out", str(exp)]
    proc = subprocess.Popen(
        [*rerun, "--set", "trainer.steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    try:  # killed once it has beaten experiment 1: the earlier attempt, credited with that, would win the session
        while proc.poll() is None and time.monotonic() < deadline:
            if any(r["val/loss"] < first.rows[1].best for r in _evaluations(exp / "metrics.jsonl")):
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert (exp / "summary.json").read_text() == earlier  # the state a killed re-run leaves: the earlier summary
    assert best_of(exp / "metrics.jsonl", "val/loss", "min")[0] < first.rows[1].best

    assert plan(out).splitlines()[-2].split()[-1] == "partial"  # not `completed`: its latest attempt did not finish
    rows = new_rows(load_session(path).experiments)
    for row in rows:
        read_row(row, out / "experiments" / row.name, "val/loss", "min")
    assert rows[0].status == "partial" and rows[0].final == {} and rows[0].wall_time_s is None
    assert "an earlier attempt's says `completed`" in rows[0].error
    assert mark_best(rows, "min") is rows[1] and not rows[0].is_best

    # the session resumes it like any unfinished experiment, and its row is then that attempt's
    again = run_session(out, echo=lambda line: None)
    assert again.ok and again.best is again.rows[1]
    assert (exp / "console.log").read_text().count("### ") == 2 and (exp / "summary.json").read_text() != earlier


@pytest.mark.slow
def test_a_rerun_the_session_started_and_that_was_killed_shows_how_it_ended(tmp_path):
    (tmp_path / "fail_then_kill.py").write_text(FAIL_THEN_KILL)
    flag = tmp_path / "failed-once"
    text = TINY.replace("steps = 5", "steps = 8")  # evaluates at step 5, fails (then is killed) at step 7
    path = write(
        tmp_path, text + f'\n[[callbacks]]\n_component_ = "fail_then_kill.FailThenKill"\nstep = 7\nflag = "{flag}"\n'
    )
    out = tmp_path / "session"
    (row,) = run_session(path, out=out, echo=lambda line: None).rows
    assert row.status == "failed" and "the first attempt fails" in row.error and "val/accuracy" in row.final

    time.sleep(1)  # as in the test above: a later second
    lines: list[str] = []
    (row,) = run_session(out, echo=lines.append).rows  # resumed: the failed experiment runs again, and is killed
    assert row.status == "failed" and row.error == "killed by SIGKILL", lines
    assert row.final == {} and row.wall_time_s is None  # not the first attempt's evaluation
    (written,) = rows_of(out)
    assert written["status"] == "failed" and written["error"] == "killed by SIGKILL"
    assert not any(v for k, v in written.items() if k.startswith("final ") or k == "wall_time_s")
    assert plan(out).splitlines()[-1].split()[-1] == "partial"  # read back later: started, no summary of its own


# --- ranking direction ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "mode"),
    [("val/loss", "min"), ("val/error", "min"), ("val/perplexity", "min"), ("val/mae", "min"), ("val/rmse", "min"),
     ("val/wer", "min"), ("val/cer", "min"), ("val/word_error", "min"), ("val/accuracy", "max"), ("val/f1", "max"),
     ("val/top1_accuracy", "max"), ("test/auroc", "max")],
)  # fmt: skip
def test_the_ranking_direction_of_known_metric_names(tmp_path, metric, mode):
    path = write(tmp_path, TINY.replace('metric = "val/accuracy"', f'metric = "{metric}"'))
    assert (load_session(path).metric, load_session(path).mode) == (metric, mode)


def test_a_metric_name_that_says_no_direction_needs_the_mode(tmp_path, capsys):
    path = write(tmp_path, TINY.replace('metric = "val/accuracy"', 'metric = "val/score"'))
    with pytest.raises(RecipeError) as info:
        load_session(path)
    (problem,) = info.value.problems
    assert problem.path == "sweep.mode" and "`val/score`" in problem.message and "--set sweep.mode=min" in problem.hint
    assert main(["sweep", str(path), "--dry-run"]) == 2  # refused before anything runs, like any recipe mistake
    assert "`sweep.mode`: cannot tell whether a smaller or a larger `val/score`" in capsys.readouterr().err
    assert load_session(path, ["sweep.mode=min"]).mode == "min"  # the mode, given, is the answer
    assert load_session(path, ["sweep.mode=max"]).mode == "max"
    # a name on both lists is as unclear as one on neither; a given mode beats any name
    both = write(tmp_path, TINY.replace('metric = "val/accuracy"', 'metric = "val/accuracy_error"'), "both.toml")
    with pytest.raises(RecipeError, match=r"`sweep\.mode`: cannot tell"):
        load_session(both)
    named = write(tmp_path, TINY.replace('metric = "val/accuracy"', 'metric = "val/loss"\nmode = "max"'), "m.toml")
    assert load_session(named).mode == "max"


def test_the_checkpoint_monitor_ranks_by_its_own_mode_or_its_name(tmp_path):
    no_sweep_metric = TINY.replace('[sweep]\nmetric = "val/accuracy"', "")
    error = write(tmp_path, no_sweep_metric + '\n[checkpoint]\nmonitor = "val/error"\n', "error.toml")
    assert (load_session(error).metric, load_session(error).mode) == ("val/error", "min")  # not the default `max`
    given = write(tmp_path, no_sweep_metric + '\n[checkpoint]\nmonitor = "val/error"\nmode = "max"\n', "g.toml")
    assert load_session(given).mode == "max"
    unknown = write(tmp_path, no_sweep_metric + '\n[checkpoint]\nmonitor = "val/score"\n', "score.toml")
    with pytest.raises(RecipeError, match=r"`checkpoint.mode`: .*`val/score` \(`checkpoint.monitor`\)"):
        load_session(unknown)  # the recipe's own problem: its checkpoints could not be ranked either
