"""TOML writing and `--set` overrides."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accelengine.errors import RecipeError
from accelengine.recipe import apply_overrides, dump_toml, load_toml, parse_toml


def test_overrides_parse_toml_values_and_create_tables():
    data = apply_overrides(
        {"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "data.train.batch_size=64", "name=mnist", "x.y=[1, 2]"]
    )
    assert data == {"optim": {"lr": 3e-4}, "data": {"train": {"batch_size": 64}}, "name": "mnist", "x": {"y": [1, 2]}}


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_bad_override(bad):
    with pytest.raises(RecipeError, match="override"):
        apply_overrides({}, [bad])


def test_override_through_a_value_is_refused():
    with pytest.raises(RecipeError, match="not a table"):
        apply_overrides({"optim": "adamw"}, ["optim.lr=1"])


keys = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8)
scalars = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=10))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=8
)


@given(st.dictionaries(keys, values, max_size=5))
@settings(max_examples=200, deadline=None)
def test_dump_then_parse_is_identity(data):
    assert parse_toml(dump_toml(data)) == data


def test_special_floats_and_none():
    text = dump_toml({"a": float("inf"), "b": None, "c": {"d": None, "e": 1}})
    back = parse_toml(text)
    assert math.isinf(back["a"]) and "b" not in back and back["c"] == {"e": 1}
    assert "# b = (unset)" in text


def test_a_byte_order_mark_before_the_recipe_is_not_part_of_it(tmp_path):
    path = tmp_path / "windows.toml"
    path.write_bytes(b"\xef\xbb\xbf" + 'name = "caf\u00e9"\n[trainer]\nepochs = 2\n'.encode())
    assert load_toml(path) == {"name": "caf\u00e9", "trainer": {"epochs": 2}}


def test_a_recipe_that_is_not_utf8_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('seed = 1\nname = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        load_toml(path)
    assert info.value.source == f"{path}:2:12"
    assert "not UTF-8 text: byte 0xe9 at line 2, column 12" in str(info.value) and "save it as UTF-8" in str(info.value)


@pytest.mark.parametrize(
    ("override", "path", "said"),
    [
        ("optim.lr=", "optim.lr", "no value after `=`"),  # e.g. an empty shell variable
        ("optim.betas=[0.9, 0.99", "optim.betas", "not valid TOML: Unclosed array"),
        ("model={_component_ = 'mlp'", "model", "not valid TOML: Unclosed inline table"),
        ("name='run", "name", "not valid TOML"),
    ],
    ids=["empty", "array", "table", "string"],
)
def test_an_override_value_that_is_not_one_is_refused_not_kept_as_a_string(override, path, said):
    # as a string it would reach a component's argument unchecked, and fail only once the run builds it
    with pytest.raises(RecipeError) as info:
        apply_overrides({}, [override])
    [problem] = info.value.problems
    assert problem.path == path and said in problem.message and f"--set '{path}=" in problem.hint, problem


def test_bare_words_in_overrides_stay_strings():
    assert apply_overrides({}, ["name=mnist", "log.project=my project", "x=1.2.3"]) == {
        "name": "mnist",
        "log": {"project": "my project"},
        "x": "1.2.3",
    }


def test_override_keys_may_be_quoted_and_array_items_are_refused_with_the_fix():
    data = apply_overrides({"data": {"my.set": {"batch_size": 1}}}, ['data."my.set".batch_size=8'])
    assert data == {"data": {"my.set": {"batch_size": 8}}}
    with pytest.raises(RecipeError) as info:
        apply_overrides({}, ["callbacks[0].patience=3"])
    [problem] = info.value.problems
    assert "bad override" in problem.message and "--set 'callbacks=[...]'" in problem.hint, problem
