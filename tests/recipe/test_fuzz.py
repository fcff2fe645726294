"""Property-based: random and mutated TOML never gives the user anything but a clean RecipeError."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelengine.errors import RecipeError
from accelengine.recipe import parse_toml, validate

DIGITS = (Path(__file__).resolve().parents[2] / "recipes" / "digits.toml").read_text()


def check(text: str) -> None:
    try:
        validate(parse_toml(text))
    except RecipeError as err:
        assert err.problems and all(str(p) for p in err.problems)


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_text(text):
    check(text)


@given(st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_recipe(data):
    text = DIGITS
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        chunk = data.draw(st.text(alphabet='abc_=[]{}"., \n0123456789-', min_size=1, max_size=6))
        if op == "delete":
            text = text[:i] + text[i + len(chunk) :]
        elif op == "insert":
            text = text[:i] + chunk + text[i:]
        else:
            text = text[:i] + chunk + text[i + len(chunk) :]
    check(text)


scalar = st.one_of(
    st.integers(-5, 5),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.booleans(),
    st.lists(st.integers(), max_size=3),
)


@given(
    st.sampled_from(["trainer", "data", "data.train", "optim", "model", "checkpoint", "metrics", ""]),
    st.text(min_size=1, max_size=10),
    scalar,
)
@settings(max_examples=200, deadline=None)
def test_random_key_injected(section, key, value):
    data = parse_toml(DIGITS)
    node = data
    for part in filter(None, section.split(".")):
        node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
    node[key] = value
    try:
        validate(data)
    except RecipeError as err:
        assert err.problems
