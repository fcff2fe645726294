"""From one session recipe to the list of experiments it describes.

Grid axes are keys ending in `_` whose value is a list (`lr_ = [1e-3, 1e-2]`), at any depth; every combination is
one experiment, and the key loses its underscore in the experiment's recipe. The optional `[sweep]` table adds
random samples (`samples` draws of `[sweep.params]`), seed repeats (`seeds`), the metric that picks the best
experiment, and how experiments are launched. Expansion is pure and deterministic: the same session always gives
the same experiments in the same order, which is what lets an interrupted session be resumed safely.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelengine.errors import Problem, RecipeError
from accelengine.recipe.components import COMPONENT_KEY, type_name
from accelengine.recipe.toml_io import format_value
from accelengine.recipe.validate import recipe_to_dict, validate

SWEEP_TABLE = "sweep"
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int_range")
SLURM_CLUSTERS = ("slurm", "local", "debug")
_SWEEP_KEYS = ("samples", "seed", "seeds", "params", "metric", "mode", "launch", "slurm")

KeyPath = tuple[str | int, ...]  # table keys and array indices, from the top of the recipe


@dataclass(frozen=True)
class Experiment:
    """One run of a session: its position, the swept values that make it different, and its full recipe."""

    index: int
    name: str  # directory name under `experiments/`: zero-padded index and a short slug of the swept values
    overrides: dict[str, Any]  # swept key path (`optim.lr`, `callbacks[0].every`, `seed`) -> value
    recipe: dict[str, Any]  # the complete recipe, `[sweep]` removed and every axis replaced by its value

    @property
    def label(self) -> str:
        """`optim.lr=0.01, model.hidden=[128]`, for messages and tables."""
        return ", ".join(f"{k}={show(v)}" for k, v in self.overrides.items()) or "no swept values"


@dataclass(frozen=True)
class Distribution:
    """One `[sweep.params]` entry: `{log_uniform = [1e-4, 1e-1]}` and the like."""

    kind: str
    args: list[Any]

    def sample(self, rng: random.Random) -> Any:
        if self.kind == "choice":
            return copy.deepcopy(rng.choice(self.args))
        low, high = self.args
        if self.kind == "uniform":
            return rng.uniform(low, high)
        if self.kind == "log_uniform":
            # exp(log(x)) can land a rounding error outside the range: keep the promise of [low, high]
            return min(max(math.exp(rng.uniform(math.log(low), math.log(high))), low), high)
        return rng.randint(low, high)  # int_range: both ends included


@dataclass(frozen=True)
class SweepConfig:
    """The parsed `[sweep]` table (all defaults when the session has none)."""

    samples: int = 0
    seed: int = 0
    seeds: int | list[int] | None = None  # a count (from the recipe's `seed` on) or the seeds themselves
    params: dict[str, Distribution] = field(default_factory=dict)
    metric: str | None = None
    mode: str | None = None
    launch: list[str] = field(default_factory=list)
    slurm: dict[str, Any] = field(default_factory=dict)


# --- paths ----------------------------------------------------------------------------------------------------------

_KEY_PATH = re.compile(r"[^.\[\]]+(\[\d+\])*(\.[^.\[\]]+(\[\d+\])*)*")
_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def format_path(path: KeyPath) -> str:
    """("callbacks", 0, "every") -> `callbacks[0].every`."""
    out = ""
    for token in path:
        out += f"[{token}]" if isinstance(token, int) else (f".{token}" if out else token)
    return out


def parse_path(text: str) -> KeyPath | None:
    """`callbacks[0].every` -> ("callbacks", 0, "every"); None when the text is not a key path."""
    if not _KEY_PATH.fullmatch(text):
        return None
    return tuple(name if name else int(index) for name, index in _TOKEN.findall(text))


def _set_path(data: dict[str, Any], path: KeyPath, value: Any) -> str | None:
    """Set `value` at `path`, creating missing tables (as `--set` does). Returns why it cannot, or None."""
    node: Any = data
    for depth, token in enumerate(path):
        parent = format_path(path[:depth]) or "the recipe"
        if isinstance(token, int) and not (isinstance(node, list) and token < len(node)):
            return f"`{parent}` has no item [{token}]"
        if isinstance(token, str) and not isinstance(node, dict):
            return f"`{parent}` is {type_name(node)}, not a table"
        if depth == len(path) - 1:
            node[token] = value
        elif isinstance(token, str) and token not in node:
            node[token] = {}
        node = node[token]
    return None


# --- values in names and tables -------------------------------------------------------------------------------------


def show(value: Any) -> str:
    """A swept value as it reads in tables: TOML spelling, floats shortened."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict) and isinstance(value.get(COMPONENT_KEY), str):
        return value[COMPONENT_KEY] + "(...)" if len(value) > 1 else value[COMPONENT_KEY]
    try:
        return format_value(value)
    except TypeError:
        return str(value)


def _said(value: Any) -> str:
    """A value quoted in a message: strings as they are, anything else in TOML spelling."""
    return value if isinstance(value, str) else show(value)


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "x".join(_short(v) for v in value) or "none"
    if isinstance(value, dict):
        return str(value.get(COMPONENT_KEY, "table"))
    return str(value)


def slug(overrides: dict[str, Any], limit: int = 60) -> str:
    """`lr=0.001-hidden=256x128`: readable, and safe in any file system and shell."""
    parts = []
    for key, value in overrides.items():
        leaf = next((t for t in reversed(parse_path(key) or (key,)) if isinstance(t, str)), key)
        parts.append(f"{leaf}={_short(value)}")
    return re.sub(r"[^A-Za-z0-9._=+-]", "", "-".join(parts))[:limit].rstrip("-.")


# --- the [sweep] table ----------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _unknown(key: str, known: tuple[str, ...], path: str) -> Problem:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`?" if close else "known keys: " + ", ".join(f"`{k}`" for k in known)
    return Problem(path, f"unknown key `{path}`", hint)


def _parse_distribution(spec: Any, path: str, problems: list[Problem]) -> Distribution | None:
    example = "e.g. `{log_uniform = [1e-4, 1e-1]}`, `{choice = [16, 32]}`"
    if not isinstance(spec, dict) or len(spec) != 1:
        problems.append(Problem(path, f"expected a table with one distribution, got {type_name(spec)}", example))
        return None
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(kind, DISTRIBUTIONS, n=1, cutoff=0.6)
        hint = f"did you mean `{close[0]}`?" if close else "use one of " + ", ".join(f"`{d}`" for d in DISTRIBUTIONS)
        problems.append(Problem(f"{path}.{kind}", f"unknown distribution `{kind}`", hint))
        return None
    where = f"{path}.{kind}"
    if kind == "choice":
        if not isinstance(args, list) or not args:
            problems.append(Problem(where, "expected a non-empty array of values", "e.g. `{choice = [16, 32, 64]}`"))
            return None
        # drawn values go into the recipe as they are: an axis in one would reach validation as an unknown key
        for i, item in enumerate(args):
            _find_axes(item, (f"{where}[{i}]",), [], problems, in_axis=_IN_CHOICE)
        return Distribution(kind, args)
    if not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) for a in args):
        problems.append(Problem(where, f"expected `[low, high]` (two numbers), got `{show(args)}`", example))
        return None
    low, high = args
    if kind == "int_range" and not (_is_int(low) and _is_int(high)):
        problems.append(Problem(where, f"expected two integers, got `{show(args)}`", "e.g. `{int_range = [16, 128]}`"))
    elif kind == "int_range" and low > high:
        problems.append(Problem(where, f"low {low} is above high {high}", "write `[low, high]`, both included"))
    elif kind != "int_range" and low >= high:
        problems.append(Problem(where, f"low {low} must be below high {high}", "write `[low, high]`"))
    elif kind == "log_uniform" and low <= 0:
        problems.append(Problem(where, f"a log-uniform range must be positive, got low {low}", "e.g. `[1e-5, 1e-1]`"))
    else:
        return Distribution(kind, [low, high])
    return None


def _flat_params(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """`"optim.lr" = {...}` and `[sweep.params.optim] lr = {...}` both mean the key path `optim.lr`: a table whose
    values are all tables is a level of nesting, anything else is a distribution."""
    out = []
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            out += _flat_params(value, path)
        else:
            out.append((path, value))
    return out


def parse_sweep(raw: Any, problems: list[Problem]) -> SweepConfig:
    """Check the `[sweep]` table, recording every problem; returns what could be read."""
    if raw is None:
        return SweepConfig()
    if not isinstance(raw, dict):
        problems.append(Problem(SWEEP_TABLE, f"expected a table `[sweep]`, got {type_name(raw)}"))
        return SweepConfig()

    def bad(key: str, message: str, hint: str = "") -> None:
        problems.append(Problem(f"sweep.{key}", message, hint))

    problems += [_unknown(key, _SWEEP_KEYS, f"sweep.{key}") for key in raw if key not in _SWEEP_KEYS]
    got: dict[str, Any] = {}
    samples, seed = raw.get("samples", 0), raw.get("seed", 0)
    if _is_int(samples) and samples >= 0:
        got["samples"] = samples
    else:
        bad("samples", f"expected a positive integer, got `{show(samples)}`", "e.g. samples = 8")
    if _is_int(seed):
        got["seed"] = seed
    else:
        bad("seed", f"expected an integer, got `{show(seed)}`", "e.g. seed = 0")

    seeds = raw.get("seeds")
    if seeds is None:
        pass
    elif _is_int(seeds) and seeds >= 1:
        got["seeds"] = seeds  # a count, resolved against the recipe's `seed` by parse_session
    elif isinstance(seeds, list) and seeds and all(_is_int(s) for s in seeds) and len(set(seeds)) == len(seeds):
        got["seeds"] = list(seeds)
    else:
        bad(
            "seeds",
            f"expected a count or an array of distinct integers, got `{show(seeds)}`",
            "e.g. `seeds = 3` (the recipe's seed and the 2 after it) or `seeds = [0, 7, 42]`",
        )

    example = '[sweep.params] "optim.lr" = {log_uniform = [1e-4, 1e-1]}'
    raw_params = raw.get("params", {})
    if not isinstance(raw_params, dict):
        bad("params", f"expected a table, got {type_name(raw_params)}", example)
        raw_params = {}
    params: dict[str, Distribution] = {}
    seen: set[str] = set()
    for key, spec in _flat_params(raw_params):
        if key in seen:  # `"optim.lr" = ...` beside `[sweep.params.optim] lr = ...`: one would silently win
            hint = 'keep one of its spellings (`"optim.lr" = ...` or `[sweep.params.optim] lr = ...`)'
            bad(f"params.{key}", f"`{key}` is given twice", hint)
            params.pop(key, None)
            continue
        seen.add(key)
        if parse_path(key) is None:
            bad(f"params.{key}", f"`{key}` is not a key path", 'write it like "optim.lr" or "callbacks[0].every"')
        elif dist := _parse_distribution(spec, f"sweep.params.{key}", problems):
            params[key] = dist
    got["params"] = params
    if params and not got.get("samples"):
        bad("samples", "`[sweep.params]` needs a number of random samples", "e.g. samples = 8")
    if got.get("samples") and not raw_params:
        bad("params", "`samples` draws from `[sweep.params]`, which is empty or missing", example)

    metric, mode = raw.get("metric"), raw.get("mode")
    if metric is None or (isinstance(metric, str) and "/" in metric):
        got["metric"] = metric
    else:
        bad("metric", f"expected `<split>/<metric>`, got `{_said(metric)}`", 'e.g. metric = "val/accuracy"')
    if mode in (None, "min", "max"):
        got["mode"] = mode
    else:
        bad("mode", f"expected `min` or `max`, got `{_said(mode)}`")

    launch = raw.get("launch", [])
    if isinstance(launch, list) and all(isinstance(a, str) for a in launch):
        got["launch"] = list(launch)
    else:
        bad(
            "launch",
            "expected an array of `accelerate launch` flags (strings)",
            'e.g. launch = ["--multi_gpu", "--num_processes", "2"]',
        )

    slurm = raw.get("slurm", {})
    if not isinstance(slurm, dict):
        bad("slurm", f"expected a table, got {type_name(slurm)}", '[sweep.slurm] partition = "gpu"')
        return SweepConfig(**got)
    if slurm.get("cluster", "slurm") not in SLURM_CLUSTERS:
        bad(
            "slurm.cluster",
            f"unknown cluster `{_said(slurm['cluster'])}`",
            "use `slurm` (the default), or `local`/`debug` to try the SLURM path on this machine",
        )
    for key in ("tasks_per_node", "ntasks_per_node"):
        if _is_int(slurm.get(key)) and slurm[key] > 1:
            bad(
                f"slurm.{key}",
                "each experiment is one SLURM task",
                "start several processes per experiment with `[sweep] launch = [...]` instead",
            )
    got["slurm"] = dict(slurm)
    return SweepConfig(**got)


# --- grid axes ------------------------------------------------------------------------------------------------------


def _is_axis_key(key: str) -> bool:
    return key.endswith("_") and key != COMPONENT_KEY


_IN_AXIS = "the value of another axis"
_IN_CHOICE = "a `choice` of `[sweep.params]`"


def _value_id(value: Any) -> str:
    """Equal for values that make the same recipe (`1` and `1.0` do not: TOML keeps them apart)."""
    return json.dumps(value, sort_keys=True, default=str)


def _find_axes(node: Any, path: KeyPath, axes: list[KeyPath], problems: list[Problem], in_axis: str = "") -> None:
    """Collect every grid axis in document order; record misuse of the trailing-underscore syntax. `in_axis` names
    the swept value `node` is part of, where an axis would not be expanded."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _find_axes(item, (*path, i), axes, problems, in_axis)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        here = (*path, key)
        where = format_path(here)
        if not _is_axis_key(key):
            _find_axes(value, here, axes, problems, in_axis)
            continue
        if not isinstance(value, list):
            message = f"a key ending in `_` is a sweep axis and needs an array of values, got {type_name(value)}"
            hint = f"write `{key} = [{show(value)}, ...]` to sweep it, or `{key[:-1]} = {show(value)}` for one value"
            problems.append(Problem(where, message, hint))
        elif in_axis:
            hint = (
                "move it out of the enclosing axis, or write the combinations out"
                if in_axis == _IN_AXIS
                else "write each combination out as one choice"
            )
            problems.append(Problem(where, f"a sweep axis inside {in_axis} is not expanded", hint))
        elif key == "_":
            problems.append(Problem(where, "`_` alone is not a key to sweep", "name the key, e.g. `lr_ = [...]`"))
        elif not value:
            problems.append(Problem(where, "an empty axis makes no experiments", "list at least one value"))
        elif len(ids := [_value_id(v) for v in value]) != len(set(ids)):
            repeated = next(v for i, v in enumerate(value) if ids.index(ids[i]) != i)
            problems.append(
                Problem(
                    where,
                    f"the value `{show(repeated)}` is listed twice: two experiments would be the same",
                    "list each value once; to repeat experiments over seeds, use `[sweep] seeds`",
                )
            )
        elif key[:-1] in node:
            problems.append(
                Problem(
                    where,
                    f"`{format_path((*path, key[:-1]))}` is both a value and a sweep axis",
                    f"keep one; to pin the axis to one value write `{key} = [value]`",
                )
            )
        else:
            axes.append(here)
        if isinstance(value, list):
            for i, item in enumerate(value):
                _find_axes(item, (*here, i), [], problems, in_axis=_IN_AXIS)


def _get(data: Any, path: KeyPath) -> Any:
    for token in path:
        data = data[token]
    return data


def _place_axis(recipe: dict[str, Any], path: KeyPath, value: Any) -> None:
    """Replace `key_ = [...]` by `key = value`, in place and at the same position (the written recipe keeps the
    order the user chose)."""
    table = _get(recipe, path[:-1])
    axis_key = path[-1]
    items = list(table.items())
    table.clear()
    for k, v in items:
        table[axis_key[:-1] if k == axis_key else k] = copy.deepcopy(value) if k == axis_key else v


# --- expansion ------------------------------------------------------------------------------------------------------


def _axis_name(path: KeyPath) -> str:
    return format_path((*path[:-1], str(path[-1])[:-1]))


def parse_session(session: dict[str, Any], source: str = "") -> tuple[SweepConfig, list[Experiment]]:
    """The `[sweep]` settings and the experiments of a parsed session recipe; RecipeError lists every problem."""
    if not isinstance(session, dict):
        raise RecipeError(Problem("", "a session recipe must be a TOML table"), source)
    problems: list[Problem] = []
    base = copy.deepcopy(session)
    config = parse_sweep(base.pop(SWEEP_TABLE, None), problems)
    axes: list[KeyPath] = []
    _find_axes(base, (), axes, problems)
    axis_names = [_axis_name(p) for p in axes]

    for key in config.params:
        if key in axis_names:
            problems.append(Problem(f"sweep.params.{key}", f"`{key}` is already a grid axis", "sweep it one way only"))
            continue
        param = parse_path(key) or ()
        # the drawn value replaces the whole table, the grid's value in it too: the axis's experiments would all
        # run the same recipe
        inner = next((n for p, n in zip(axes, axis_names, strict=True) if p[: len(param)] == param), None)
        if inner is not None:
            hint = f"draw `{inner}` as a random parameter too, or make `{key}` a grid axis"
            problems.append(Problem(f"sweep.params.{key}", f"`{key}` would replace the grid axis `{inner}`", hint))
    seeds: list[int] = [base.get("seed", 0)] if _is_int(base.get("seed", 0)) else [0]
    if config.seeds is not None:
        if "seed" in axis_names or "seed" in config.params:
            hint = "drop `sweep.seeds` or the other `seed` axis"
            problems.append(Problem("sweep.seeds", "`seed` is swept already", hint))
        count_or_list = config.seeds
        seeds = list(range(seeds[0], seeds[0] + count_or_list)) if isinstance(count_or_list, int) else count_or_list
    if problems:
        raise RecipeError(problems, source)

    # Each parameter draws from its own generator, seeded by the sweep seed and its key: adding a parameter or more
    # samples leaves the values already drawn for the others unchanged.
    draws = {
        key: [dist.sample(rng) for _ in range(config.samples)]
        for key, dist in config.params.items()
        for rng in [random.Random(f"{config.seed}/{key}")]
    }
    grid = list(itertools.product(*(_get(base, p) for p in axes)))
    # a table drawn whole (`optim`) before the keys drawn into it (`optim.lr`), whatever the order they are written in
    placing = sorted(config.params, key=lambda k: len(parse_path(k) or ()))
    sweep_seed = config.seeds is not None
    total = max(config.samples, 1) * len(grid) * len(seeds)
    width = max(2, len(str(total - 1)))
    experiments: list[Experiment] = []
    for sample in range(max(config.samples, 1)):
        for combo in grid:
            for seed in seeds:
                recipe = copy.deepcopy(base)
                overrides: dict[str, Any] = {}
                for path, name, value in zip(axes, axis_names, combo, strict=True):
                    _place_axis(recipe, path, value)
                    overrides[name] = copy.deepcopy(value)
                for key in config.params:
                    overrides[key] = draws[key][sample]
                for key in placing:
                    why = _set_path(recipe, parse_path(key) or (), copy.deepcopy(draws[key][sample]))  # checked
                    if why:
                        problems.append(Problem(f"sweep.params.{key}", f"cannot set `{key}`: {why}"))
                if sweep_seed:
                    recipe["seed"] = seed
                    overrides["seed"] = seed
                index = len(experiments)
                name = f"{index:0{width}d}" + (f"-{slug(overrides)}" if overrides else "")
                experiments.append(Experiment(index, name, overrides, recipe))
    if problems:
        raise RecipeError(list(dict.fromkeys(problems)), source)  # the same path problem repeats in every experiment
    return config, experiments


def expand(session: dict[str, Any]) -> list[Experiment]:
    """Every experiment of a parsed session recipe, in a fixed order: random samples (outermost), then the grid
    (first axis slowest), then seeds. Raises RecipeError for misuse of the syntax; does not validate the recipes."""
    return parse_session(session)[1]


def validate_experiments(
    experiments: list[Experiment], source: str = "", recipe_dir: Path | None = None
) -> list[dict[str, Any]]:
    """Validate every experiment's recipe; returns the resolved recipes (defaults filled in). All problems of all
    experiments are raised together, each prefixed with the experiment's index and swept values; a problem that
    every experiment shares (a typo outside the axes) is reported once."""
    resolved: list[dict[str, Any]] = []
    found: dict[str, list[Experiment]] = {}
    for exp in experiments:
        try:
            resolved.append(recipe_to_dict(validate(copy.deepcopy(exp.recipe), source, recipe_dir)))
        except RecipeError as err:
            for problem in err.problems:
                found.setdefault(str(problem), []).append(exp)
    if not found:
        return resolved
    problems = []
    for text, exps in found.items():
        if len(exps) == len(experiments) > 1:
            problems.append(Problem("", f"every experiment: {text}"))
        else:
            problems += [Problem("", f"experiment {e.index} [{e.label}]: {text}") for e in exps]
    raise RecipeError(problems, source)


__all__ = [
    "DISTRIBUTIONS",
    "Distribution",
    "Experiment",
    "SweepConfig",
    "expand",
    "format_path",
    "parse_path",
    "parse_session",
    "parse_sweep",
    "show",
    "slug",
    "validate_experiments",
]
