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
