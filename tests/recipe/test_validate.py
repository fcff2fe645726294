"""Recipe validation: every kind of mistake is reported with its key path, all at once."""

from __future__ import annotations

import pytest

from accelengine.errors import RecipeError
from accelengine.recipe import dump_toml, parse_toml, recipe_to_dict, validate

BASE = """
model = { _component_ = "mlp", in_features = 8, out_features = 3 }
loss = "cross_entropy"
optim = { _component_ = "adamw", lr = 1e-3 }
[data.train]
dataset = { _component_ = "synthetic_classification", features = 8, classes = 3 }
[trainer]
epochs = 1
"""


def problems(text: str) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate(parse_toml(text))
    return [f"{p.path}|{p}" for p in info.value.problems]


def one(text: str) -> str:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def test_base_is_valid():
    recipe = validate(parse_toml(BASE))
    assert recipe.trainer.epochs == 1 and recipe.data.loaders["train"].dataset.target == "synthetic_classification"


def test_unknown_component_argument_suggests_the_parameter():
    text = BASE.replace("lr = 1e-3", "lerning_rate = 1e-3")
    msg = one(text)
    assert msg.startswith("optim.lerning_rate|") and "did you mean `lr`?" in msg


def test_unknown_section_key_suggests():
    msg = one(BASE + "log_evry = 5\n")
    assert msg.startswith("trainer.log_evry|") and "log_every" in msg


def test_unknown_top_level_key():
    msg = one("modle = 1\n" + BASE)
    assert msg.startswith("modle|") and "`model`" in msg


def test_wrong_type():
    msg = one(BASE.replace("epochs = 1", 'epochs = "ten"'))
    assert msg.startswith("trainer.epochs|") and "expected an integer" in msg


def test_bool_is_not_an_integer():
    assert one(BASE.replace("epochs = 1", "epochs = true")).startswith("trainer.epochs|")


def test_literal_choice_suggests():
    msg = one(BASE + 'mixed_precision = "bf61"\n')
    assert msg.startswith("trainer.mixed_precision|") and "bf16" in msg


def test_epochs_and_steps_are_exclusive():
    msg = one(BASE + "steps = 10\n")
    assert msg.startswith("trainer.epochs|") and "exactly one" in msg


def test_length_required_for_training():
    assert "exactly one" in one(BASE.replace("epochs = 1", ""))


def test_eval_only_needs_no_optimizer_or_length():
    text = (
        BASE.replace("[data.train]", "[data.val]")
        .replace("epochs = 1", "")
        .replace('optim = { _component_ = "adamw", lr = 1e-3 }', "")
    )
    recipe = validate(parse_toml(text))
    assert recipe.optim is None and list(recipe.data.loaders) == ["val"]


def test_training_needs_optimizer():
    msg = one(BASE.replace('optim = { _component_ = "adamw", lr = 1e-3 }', ""))
    assert msg.startswith("optim|")


def test_missing_model():
    assert one(BASE.replace('model = { _component_ = "mlp", in_features = 8, out_features = 3 }', "")).startswith(
        "model|"
    )


def test_unimportable_component_suggests_builtin():
    msg = one(BASE.replace('loss = "cross_entropy"', 'loss = "cross_entrpy"'))
    assert msg.startswith("loss._component_|") and "cross_entropy" in msg


def test_unimportable_dotted_path_suggests_attribute():
    msg = one(BASE.replace('"adamw"', '"torch.optim.AdamWW"'))
    assert msg.startswith("optim._component_|") and "torch.optim.AdamW" in msg


@pytest.mark.parametrize("target", [".", "torch..nn.Linear", ".torch.nn", "torch.nn.", "torch.9nn"])
def test_malformed_dotted_path_is_a_recipe_error(target):
    msg = one(BASE.replace('loss = "cross_entropy"', f'loss = "{target}"'))
    assert msg.startswith("loss._component_|") and "dotted path" in msg


def test_runtime_argument_in_recipe_is_refused():
    msg = one(BASE.replace("lr = 1e-3", "lr = 1e-3, params = 1"))
    assert msg.startswith("optim.params|") and "supplied by the engine" in msg


def test_missing_required_argument():
    msg = one(BASE.replace(", out_features = 3", ""))
    assert msg.startswith("model.out_features|") and "missing required" in msg


def test_component_table_without_component_key():
    msg = one(BASE.replace('{ _component_ = "mlp",', '{ _componet_ = "mlp",'))
    assert msg.startswith("model|") and "_component_" in msg


def test_nested_component_arguments_are_checked():
    msg = one(BASE.replace("classes = 3 }", "classes = 3, sampels = 4 }"))
    assert msg.startswith("data.train.dataset.sampels|") and "samples" in msg


def test_loader_without_dataset():
    msg = one(BASE + "[data.val]\nbatch_size = 4\n")
    assert msg.startswith("data.val.dataset|")


def test_negative_values():
    found = problems(BASE.replace("epochs = 1", "epochs = 0\nlog_every = -1"))
    assert {f.split("|")[0] for f in found} == {"trainer.epochs", "trainer.log_every"}


def test_every_problem_reported_at_once():
    text = BASE.replace("lr = 1e-3", "lerning_rate = 1e-3").replace("epochs = 1", "epoch = 1\nmixed_precision = 'x'")
    found = problems(text)
    paths = {f.split("|")[0] for f in found}
    assert {"optim.lerning_rate", "trainer.epoch", "trainer.mixed_precision"} <= paths


def test_sweep_axes_point_to_sweep_command():
    msg = one(BASE.replace("lr = 1e-3", "lr_ = [1e-3, 1e-2]"))
    assert msg.startswith("optim.lr_|") and "accelengine sweep" in msg


def test_plain_list_is_not_a_sweep():
    recipe = validate(parse_toml(BASE.replace("out_features = 3 }", "out_features = 3, hidden = [4, 4] }")))
    assert recipe.model.kwargs["hidden"] == [4, 4]


def test_syntax_error_names_line_and_column():
    with pytest.raises(RecipeError) as info:
        parse_toml("a = 1\nb = [1,\n", "r.toml")
    assert info.value.source.startswith("r.toml:") and "line" in str(info.value) and "column" in str(info.value)


def test_resolved_recipe_round_trips():
    recipe = validate(parse_toml(BASE))
    resolved = recipe_to_dict(recipe)
    again = validate(parse_toml(dump_toml(resolved)))
    assert recipe_to_dict(again) == resolved
    assert resolved["trainer"]["log_every"] == 10 and resolved["data"]["batch_size"] == 32


def test_reference_doc_is_generated_from_the_schema():
    from pathlib import Path

    from accelengine.recipe.reference import reference_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"
    assert doc.read_text() == reference_markdown(), "regenerate: accelengine reference > docs/recipe-reference.md"


def test_values_that_would_fail_at_run_time_are_caught_here():
    text = "seed = -1\n" + BASE.replace("[trainer]", "[trainer]\nmax_grad_norm = nan").replace(
        "[data.train]", "[data]\nbatch_size = 99999999999999999999\n[data.train]\nnum_workers = -1"
    )
    found = problems(text + '[checkpoint]\nsignals = ["SIGKILL", "SIG_DFL"]\n')
    assert [p.split("|")[0] for p in found] == [
        "data.batch_size",
        "trainer.max_grad_norm",
        "seed",
        "data.train.num_workers",
        "checkpoint.signals[0]",
        "checkpoint.signals[1]",
    ], found
    assert "cannot be caught" in found[4] and "unknown signal `SIG_DFL`" in found[5]


def test_a_length_without_a_train_set_is_refused_with_the_likely_typo():
    msg = one(BASE.replace("[data.train]", "[data.trian]"))
    assert msg.startswith("data|") and "`trainer.epochs` is set" in msg and "did you mean `data.train`" in msg


def test_the_engine_must_be_an_engine_class():
    msg = one(BASE + '[engine]\n_component_ = "torch.nn.Module"\n')
    assert msg.startswith("engine._component_|") and "not accelengine.Engine" in msg
    assert validate(parse_toml(BASE + '[engine]\n_component_ = "accelengine.Engine"\n')).engine.target


def test_a_missing_dependency_inside_a_module_names_the_dependency(tmp_path, monkeypatch):
    # the missing dependency's name is the start of the module's own name: still the dependency is named
    (tmp_path / "lossmodule.py").write_text("import lossmod\n\ndef f():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = one(BASE.replace('loss = "cross_entropy"', 'loss = "lossmodule.f"'))
    assert "'lossmod'" in msg and "no module named `lossmodule`" not in msg, msg


def test_overrides_are_stripped_and_every_bad_one_is_reported():
    from accelengine.recipe import apply_overrides

    data = parse_toml(BASE)
    apply_overrides(data, ["name = spaced", "trainer.epochs= 3"])
    assert data["name"] == "spaced" and data["trainer"]["epochs"] == 3
    with pytest.raises(RecipeError) as info:
        apply_overrides(parse_toml(BASE), ["foo", "loss.reduction=sum", "bar"])
    assert [p.path for p in info.value.problems] == ["foo", "loss", "bar"]


def test_dates_and_times_in_free_values_are_written_back():
    import datetime as dt

    values = {"when": dt.date(2024, 1, 1), "at": dt.time(1, 30), "stamp": dt.datetime(2024, 1, 1, 12, 0, 5)}
    text = dump_toml({"log": {"tracker_kwargs": {"tensorboard": values}}})
    assert parse_toml(text)["log"]["tracker_kwargs"]["tensorboard"] == values


def test_a_typo_is_reported_once_not_again_as_the_key_it_meant():
    found = problems(BASE.replace("epochs = 1", "epoch = 5").replace("lr = 1e-3", "lerning_rate = 1e-3"))
    assert [p.split("|")[0] for p in found] == ["trainer.epoch", "optim.lerning_rate"], found  # as in the README
    found = problems(BASE.replace("in_features = 8", "in_feature = 8"))
    assert [p.split("|")[0] for p in found] == ["model.in_feature"], found


def test_the_engine_passed_first_argument_matches_any_name(tmp_path, monkeypatch):
    (tmp_path / "factories.py").write_text(
        "import torch\n\n\n"
        "def my_opt(parameters, lr=1e-3):\n    return torch.optim.SGD(parameters, lr=lr)\n\n\n"
        "def my_sched(opt, total_steps, warmup=0):\n"
        "    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)\n\n\n"
        "def no_args():\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    text = BASE.replace('{ _component_ = "adamw", lr = 1e-3 }', '{ _component_ = "factories.my_opt", lr = 0.1 }')
    recipe = validate(parse_toml('scheduler = { _component_ = "factories.my_sched", warmup = 2 }\n' + text))
    assert recipe.optim.target == "factories.my_opt" and recipe.scheduler.kwargs == {"warmup": 2}
    msg = one(BASE.replace('{ _component_ = "adamw", lr = 1e-3 }', '"factories.no_args"'))
    assert msg.startswith("optim._component_|") and "takes no positional argument for the `params`" in msg
    msg = one(text.replace("lr = 0.1", "parameters = 1"))
    assert msg.startswith("optim.parameters|") and "supplied by the engine" in msg


def test_recipe_folder_falls_back_to_the_recipes_own_when_the_record_is_damaged_or_gone(tmp_path):
    from accelengine.recipe.validate import recipe_folder

    original = tmp_path / "original"
    original.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(BASE)
    assert recipe_folder(run / "recipe.toml") == run.resolve()  # no env.json: a plain recipe
    for env, expected in [
        (f'{{"recipe_dir": "{original}"}}', original),
        (f'{{"recipe_dir": "{tmp_path / "gone"}"}}', run.resolve()),  # moved to another machine
        ("{not json", run.resolve()),
        ('["a list"]', run.resolve()),
    ]:
        (run / "env.json").write_text(env)
        assert recipe_folder(run / "recipe.toml") == expected, env


@pytest.mark.parametrize(
    "code, line, error",
    [
        ("import torch\n\n\ndef Net(:\n    pass\n", 4, "SyntaxError: invalid syntax at "),
        ("def Net():\n    x = 1\n        y = 2\n", 3, "IndentationError: unexpected indent at "),
        ("import torch\n\nundefined_name\n", 3, "NameError: name 'undefined_name' is not defined (at "),
        ("import os\n\nos.no_such_attribute\n", 3, "AttributeError: module 'os' has no attribute 'no_such_attribute'"),
        ("raise RuntimeError('needs a GPU')\n", 1, "RuntimeError: needs a GPU (at "),
    ],
    ids=["syntax", "indentation", "name", "attribute", "runtime"],
)
def test_a_module_that_fails_to_import_is_one_problem_naming_key_file_and_line(
    tmp_path, monkeypatch, code, line, error
):
    module = f"broken_{tmp_path.name.replace('-', '_')}"  # a fresh name each case: nothing cached from another
    (tmp_path / f"{module}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = one(BASE.replace('{ _component_ = "mlp", in_features = 8, out_features = 3 }', f'"{module}.Net"'))
    assert msg.startswith("model._component_|") and f"importing `{module}` failed: {error}" in msg, msg
    assert f"{tmp_path / module}.py, line {line}" in msg and "fix the module's code" in msg, msg


@pytest.mark.parametrize(
    "raise_line, error, hint",
    [
        ("raise RuntimeError('backend not ready')", "RuntimeError: backend not ready (at ", "fix the module's code"),
        ("import missing_optional_dependency", "No module named 'missing_optional_dependency'", "install `missing_"),
    ],
    ids=["runtime", "missing-dependency"],
)
def test_a_lazy_module_attribute_that_raises_is_one_problem_not_a_traceback(
    tmp_path, monkeypatch, raise_line, error, hint
):
    module = f"lazy_{tmp_path.name.replace('-', '_')}"  # a module whose names are made on first use
    (tmp_path / f"{module}.py").write_text(f"def __getattr__(name):\n    {raise_line}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = one(BASE.replace('{ _component_ = "mlp", in_features = 8, out_features = 3 }', f'"{module}.Net"'))
    assert msg.startswith("model._component_|") and f"importing `{module}.Net` failed: " in msg, msg
    assert error in msg and hint in msg, msg
    if "RuntimeError" in error:
        assert f"{tmp_path / module}.py, line 2" in msg, msg


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_or_exit_while_importing_a_module_is_not_turned_into_a_problem(tmp_path, monkeypatch, raised):
    module = f"exits_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(f"raise {raised.__name__}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(raised):
        validate(parse_toml(BASE.replace('loss = "cross_entropy"', f'loss = "{module}.f"')))


@pytest.mark.parametrize(
    "name, why",
    [
        ("", "the run name is empty"),
        ("/tmp/abs", 'contains "/"'),
        ("C:\\\\runs", 'contains ":", "\\\\"'),
        ("a/b", 'contains "/"'),
        ("../up", 'contains "/"'),
        ("..", 'starts with "."'),
        (".hidden", 'starts with "."'),
        ("-rf", 'starts with "-"'),
        ("a b", 'contains " "'),
        ("x:y*?", 'contains ":", "*", "?"'),
        ("tab\\tname", 'contains "\\t"'),
        ("n" * 101, "101 characters long"),
    ],
    ids=[
        "empty",
        "absolute",
        "windows",
        "separator",
        "up",
        "dotdot",
        "hidden",
        "dash",
        "space",
        "reserved",
        "tab",
        "long",
    ],
)
def test_the_run_name_must_be_one_plain_directory_name(name, why):
    msg = one(f'name = "{name}"\n' + BASE)
    assert msg.startswith("name|") and why in msg, msg
    assert "at most 100" in msg if len(name) > 100 else "use letters, digits, `_`, `-` and `.`" in msg


@pytest.mark.parametrize("name", ["digits", "digits_sweep", "r64-1", "v1.2", "_private", "caf\u00e9-2", "a..b"])
def test_plain_run_names_are_accepted(name):
    assert validate(parse_toml(f'name = "{name}"\n' + BASE)).name == name


@pytest.mark.parametrize(
    ("file", "name"), [("my recipe (v2).toml", "my-recipe-v2"), ("-x.toml", "x"), ("...toml", "run"), ("ok.toml", "ok")]
)
def test_a_file_name_that_cannot_be_a_run_name_gives_a_default_that_can(tmp_path, file, name):
    # the recipe gives no `name`: its file's name becomes one, not a problem at a key the recipe never wrote
    from accelengine.recipe.validate import load_recipe

    (tmp_path / file).write_text(BASE)
    assert load_recipe(tmp_path / file).name == name


POSITIONAL_ONLY = (
    "import torch\n\n\n"
    "def net(in_features, /, out_features=3):\n    return torch.nn.Linear(in_features, out_features)\n\n\n"
    "def net_options(in_features, /, **options):\n    return torch.nn.Linear(in_features, 3, **options)\n\n\n"
    "def net_fixed(in_features=8, /, out_features=3):\n    return torch.nn.Linear(in_features, out_features)\n\n\n"
    "def my_opt(parameters, /, lr=1e-3):\n    return torch.optim.SGD(parameters, lr=lr)\n\n\n"
    "def my_sched(opt, total_steps, /):\n    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)\n"
)


def test_positional_only_parameters_are_reported_at_validation(tmp_path, monkeypatch):
    (tmp_path / "positional.py").write_text(POSITIONAL_ONLY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = '{ _component_ = "mlp", in_features = 8, out_features = 3 }'

    # a recipe key for a positional-only parameter: not "unknown", and not swallowed by `**options`
    for target in ("positional.net", "positional.net_options"):
        msg = one(BASE.replace(model, f'{{ _component_ = "{target}", in_features = 8 }}'))
        assert msg.startswith("model.in_features|") and f"positional-only in `{target}`" in msg, msg
        assert "unknown key" not in msg and "did you mean" not in msg, msg
    # a required positional-only parameter nothing gives
    msg = one(BASE.replace(model, '"positional.net"'))
    assert msg.startswith("model._component_|") and "requires the positional-only argument `in_features`" in msg
    # the engine passes the scheduler's `total_steps` by keyword
    msg = one('scheduler = "positional.my_sched"\n' + BASE)
    assert msg.startswith("scheduler._component_|") and "`total_steps` is positional-only" in msg, msg
    # what works: a default before `/`, and the optimizer's parameters passed by position
    text = BASE.replace(model, '{ _component_ = "positional.net_fixed", out_features = 3 }')
    recipe = validate(parse_toml(text.replace('{ _component_ = "adamw", lr = 1e-3 }', '"positional.my_opt"')))
    assert recipe.model.target == "positional.net_fixed" and recipe.optim.target == "positional.my_opt"


def test_a_checkpoint_monitor_whose_name_says_no_direction_needs_its_mode():
    text = BASE + '[data.val]\ndataset = "digits"\n[checkpoint]\nmonitor = "val/score"\n'
    with pytest.raises(RecipeError) as info:
        validate(parse_toml(text))
    [problem] = [p for p in info.value.problems if p.path == "checkpoint.mode"]
    assert "`val/score`" in problem.message and 'mode = "min"' in problem.hint
    assert validate(parse_toml(text + 'mode = "max"\n')).checkpoint.mode == "max"
    text = text.replace('monitor = "val/score"\n', 'monitor = "val/loss"\n')
    assert validate(parse_toml(text)).checkpoint.mode is None  # says min


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (BASE.replace("epochs = 1", "step = 10"), "trainer.step"),
        (BASE.replace("epochs = 1", 'steps = "10"'), "trainer.steps"),
        ("trainer = 1\n" + BASE.replace("[trainer]\nepochs = 1\n", ""), "trainer"),
        (BASE.replace("[data.train]", '[data]\ntrain = "digits"\n[data.val]'), "data.train"),
    ],
    ids=["steps-misspelt", "steps-a-string", "trainer-not-a-table", "train-not-a-table"],
)
def test_a_wrong_length_or_train_set_is_not_reported_again_as_missing(text, path):
    # "set exactly one of epochs and steps" / "no train data set" would only echo the problem already reported
    assert one(text).startswith(f"{path}|")


def test_a_sweep_table_is_refused_by_a_single_run_with_the_sweep_command():
    msg = one(BASE + '[sweep]\nsamples = 2\n[sweep.params]\n"optim.lr" = {log_uniform = [1e-4, 1e-2]}\n')
    assert msg.startswith("sweep|") and "accelengine sweep" in msg and "did you mean" not in msg, msg
    msg = one(BASE.replace("lr = 1e-3", "lr_ = [1e-3, 1e-2]") + "[sweep]\nseeds = 2\n")
    assert msg.startswith("optim.lr_|") and "`[sweep]`" in msg and "accelengine sweep" in msg, msg


def test_a_checkpoint_monitor_must_name_an_evaluation_set():
    # evaluation results are `<set>/<metric>`: another name ranks nothing, or stops the run at its first evaluation
    msg = one(BASE + '[checkpoint]\nmonitor = "val/accuracy"\n')
    assert msg.startswith("checkpoint.monitor|") and "add an evaluation set, e.g. `[data.val]`" in msg, msg
    with_val = BASE + '[data.val]\ndataset = "digits"\n[checkpoint]\n'
    msg = one(with_val + 'monitor = "vall/accuracy"\n')
    assert msg.startswith("checkpoint.monitor|") and "did you mean `val/accuracy`?" in msg, msg
    assert validate(parse_toml(with_val + 'monitor = "val/accuracy"\n')).checkpoint.monitor == "val/accuracy"


def test_a_nested_component_is_checked_when_the_outer_one_cannot_be_imported():
    model = '{ _component_ = "mlp", in_features = 8, out_features = 3 }'
    found = problems(BASE.replace(model, '{ _component_ = "mlpp", act = { _component_ = "torch.nn.ReLUU" } }'))
    assert [p.split("|")[0] for p in found] == ["model._component_", "model.act._component_"], found
    assert "torch.nn.ReLU" in found[1]


def test_keep_last_zero_keeps_every_checkpoint_and_a_negative_one_is_refused():
    recipe = validate(parse_toml(BASE + "\n[checkpoint]\nkeep_last = 0\n"))
    assert recipe.checkpoint.keep_last == 0
    msg = one(BASE + "\n[checkpoint]\nkeep_last = -1\n")
    assert msg.startswith("checkpoint.keep_last|") and "must be 0 or more, got -1" in msg, msg


@pytest.mark.parametrize("value", ["-1.0", "nan"])
def test_a_negative_or_nan_progress_interval_is_refused(value):
    msg = one(BASE + f"\n[log]\nprogress_every_s = {value}\n")
    assert msg.startswith("log.progress_every_s|") and "must be 0 or more" in msg, msg
