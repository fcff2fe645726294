"""Turn a parsed TOML dict into a typed `Recipe`, collecting every problem before raising one RecipeError.

Nothing here builds a model or touches data: components are imported and their signatures checked, no more.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from accelengine.callbacks.progress import metric_mode
from accelengine.errors import Problem, RecipeError
from accelengine.recipe.components import (
    COMPONENT_KEY,
    ComponentSpec,
    check_component,
    ensure_import_paths,
    parse_component,
    type_name,
)
from accelengine.recipe.schema import RUNTIME_ARGS, DataSection, LoaderSection, Recipe
from accelengine.recipe.toml_io import apply_overrides, format_value, load_toml


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X (a missing value is the default; TOML has no null)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def describe(tp: Any) -> str:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp is Any:
        text = "any value"
    elif tp is ComponentSpec:
        text = "a component"
    elif origin is Literal:
        text = "one of " + ", ".join(f"`{a}`" for a in typing.get_args(tp))
    elif origin is list:
        text = f"an array of {describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    elif origin is dict or dataclasses.is_dataclass(tp):
        text = "a table"
    else:
        text = {int: "an integer", float: "a number", bool: "a boolean", str: "a string"}.get(tp, str(tp))
    return text


def _convert(value: Any, tp: Any, path: str, problems: list[Problem]) -> Any:
    """Check `value` against the type `tp`; returns the converted value (or None after recording a problem)."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    bad = Problem(path, f"expected {describe(tp)}, got {type_name(value)} `{value!r}`"[:200])
    if tp is Any:  # free-form values handed on as they are (e.g. a tracker's own arguments)
        return value
    if tp is ComponentSpec:
        spec = parse_component(value, path, problems)
        return spec
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(bad)
            return None
        return build_section(tp, value, path, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            problems.append(Problem(path, bad.message, f"did you mean `{close[0]}`?" if close else ""))
            return None
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(bad)
            return None
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(bad)
            return None
        _, item_tp = typing.get_args(tp)
        return {k: _convert(v, item_tp, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(bad)
            return None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(bad)
            return None
        if not -(2**63) <= value < 2**63:  # what TOML's integers hold (and the loader's index arithmetic)
            problems.append(Problem(path, f"{value} is too large: at most {2**63 - 1}"))
            return None
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            problems.append(bad)
            return None
        return value
    raise TypeError(f"schema type {tp} is not supported")  # a bug in the schema, not in the recipe


def build_section(cls: type, data: dict[str, Any], path: str, problems: list[Problem]) -> Any:
    """Fill a section dataclass from a dict; unknown keys are reported with the closest known key."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    flatten = next((f.name for f in fields.values() if f.metadata.get("flatten")), None)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else key
        if key in fields and key != flatten:
            values[key] = _convert(value, hints[key], key_path, problems)
        elif flatten and isinstance(value, dict):
            extra[key] = value  # e.g. a named loader inside [data]
        else:
            known = [n for n in fields if n != flatten]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            where = f" in `[{path}]`" if path else ""
            hint = f"did you mean `{close[0]}`?" if close else "known keys: " + ", ".join(f"`{k}`" for k in known)
            if flatten and not close:
                hint += f"; a named {flatten[:-1]} is a table `[{path}.{key}]`"
            problems.append(Problem(key_path, f"unknown key `{key_path}`{where}", hint))
    if flatten:
        values[flatten] = _convert(extra, hints[flatten], path, problems)
    for name, value in list(values.items()):
        if value is None and name in data:
            del values[name]  # a problem was recorded; keep the default so later checks still run
    return cls(**values)


def _sweep_keys(data: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else k
            if k.endswith("_") and k != "_component_" and isinstance(v, list):
                found.append(p)
            found += _sweep_keys(v, p)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += _sweep_keys(v, f"{path}[{i}]")
    return found


# The run's name is a directory (`runs/<name>/`), a tracker's project and a SLURM job name: one plain path component.
RUN_NAME = re.compile(r"\w[\w.-]*")  # letters and digits of any script, `_`, then also `.` and `-`
RUN_NAME_LENGTH = 100


def _run_name_problem(name: str) -> Problem | None:
    """Why `name` cannot name a run directory, or None. Path separators (so absolute paths and `../x`), `.`, `..` and
    hidden directories, a leading `-` (read as an option in a shell) and characters some file systems refuse (`:`,
    `*`, `?`, control characters...) are all kept out."""
    rule = 'use letters, digits, `_`, `-` and `.`, starting with a letter, digit or `_`, e.g. name = "mnist-small"'
    if len(name) > RUN_NAME_LENGTH:
        return Problem("name", f"the run name is {len(name)} characters long", f"at most {RUN_NAME_LENGTH}")
    if RUN_NAME.fullmatch(name):
        return None
    if not name:
        return Problem("name", "the run name is empty", rule)
    bad = [c for c in dict.fromkeys(name[1:]) if not RUN_NAME.fullmatch(f"_{c}")]
    why = "contains " + ", ".join(format_value(c) for c in bad) if bad else f"starts with {format_value(name[0])}"
    return Problem("name", f"{format_value(name)} cannot name the run directory `runs/<name>/`: it {why}", rule)


def name_from_file(path: str | Path) -> str:
    """The default run name: the recipe file's stem, with what cannot be in a run name replaced by `-` (a name the
    recipe does not give is not the recipe's mistake)."""
    name = re.sub(r"[^\w.-]+", "-", Path(path).stem).strip(".-")[:RUN_NAME_LENGTH]
    return name or "run"


def _cross_checks(recipe: Recipe, problems: list[Problem]) -> None:
    t, ck = recipe.trainer, recipe.checkpoint
    # a key already reported as wrong reads as unset here: a check that needs it would only echo that problem
    said = _named(problems)
    if ck.monitor and ck.mode is None and metric_mode(ck.monitor) is None:
        problems.append(
            Problem(
                "checkpoint.mode",
                f"cannot tell whether a smaller or a larger `{ck.monitor}` (`checkpoint.monitor`) is better",
                'set `mode = "min"` or `mode = "max"` in `[checkpoint]`',
            )
        )
    evaluated = [name for name in recipe.data.loaders if name != "train"]
    if ck.monitor and "train" in recipe.data.loaders and not any(ck.monitor.startswith(f"{n}/") for n in evaluated):
        # evaluation results are named `<data set>/<metric>`: any other name is never produced, so checkpoints would
        # be ranked by nothing (no evaluation set), or the run would stop at its first evaluation (a typo)
        close = difflib.get_close_matches(ck.monitor.partition("/")[0], evaluated, n=1)
        if close:
            hint = f"did you mean `{close[0]}/{ck.monitor.partition('/')[2]}`?"
        elif evaluated:
            hint = "name an evaluation set first: " + ", ".join(f"`{n}/...`" for n in evaluated)
        else:
            hint = "add an evaluation set, e.g. `[data.val]`, and monitor one of its metrics, e.g. `val/loss`"
        problems.append(
            Problem(
                "checkpoint.monitor", f"`{ck.monitor}` is not a metric of an evaluation set (`<set>/<metric>`)", hint
            )
        )
    name_problem = _run_name_problem(recipe.name)
    if name_problem:
        problems.append(name_problem)
    training = "train" in recipe.data.loaders
    length_said = bool(said & {"trainer", "trainer.epochs", "trainer.steps"})
    if training and (t.epochs is None) == (t.steps is None) and not length_said:
        problems.append(
            Problem("trainer.epochs", "set exactly one of `trainer.epochs` and `trainer.steps`", "e.g. epochs = 10")
        )
    for name in ("epochs", "steps", "eval_every", "log_every", "grad_accum"):
        v = getattr(t, name)
        if v is not None and v < 1:
            problems.append(Problem(f"trainer.{name}", f"must be at least 1, got {v}"))
    if t.max_grad_norm is not None and not 0 < t.max_grad_norm < math.inf:  # nan fails too
        problems.append(Problem("trainer.max_grad_norm", f"must be a positive number, got {t.max_grad_norm}"))
    if not 0 <= recipe.seed < 2**32:
        problems.append(Problem("seed", f"must be between 0 and 2**32 - 1, got {recipe.seed}"))
    for name in ("every_steps", "every_epochs"):
        v = getattr(ck, name)
        if v is not None and v < 1:
            problems.append(Problem(f"checkpoint.{name}", f"must be at least 1, got {v}"))
    for name in ("keep_last", "keep_best"):
        v = getattr(ck, name)
        if v is not None and v < 0:
            problems.append(Problem(f"checkpoint.{name}", f"must be 0 or more, got {v}"))
    if recipe.data.batch_size < 1:
        problems.append(Problem("data.batch_size", f"must be at least 1, got {recipe.data.batch_size}"))
    if recipe.data.num_workers < 0:
        problems.append(Problem("data.num_workers", f"must be 0 or more, got {recipe.data.num_workers}"))
    for name, loader in recipe.data.loaders.items():
        if loader.dataset is None:
            problems.append(Problem(f"data.{name}.dataset", "missing: every data set needs a `dataset` component"))
        if loader.batch_size is not None and loader.batch_size < 1:
            problems.append(Problem(f"data.{name}.batch_size", f"must be at least 1, got {loader.batch_size}"))
        if loader.num_workers is not None and loader.num_workers < 0:
            problems.append(Problem(f"data.{name}.num_workers", f"must be 0 or more, got {loader.num_workers}"))
    if not training and (t.epochs is not None or t.steps is not None) and not said & {"data", "data.train"}:
        close = difflib.get_close_matches("train", list(recipe.data.loaders), n=1)
        hint = f"did you mean `data.train`, not `data.{close[0]}`?" if close else "name the training set `data.train`"
        which = "trainer.steps" if t.steps is not None else "trainer.epochs"
        problems.append(Problem("data", f"`{which}` is set but there is no `train` data set to train on", hint))
    if not recipe.data.loaders:
        problems.append(Problem("data", "no data sets", "add a `[data.train]` table (and `[data.val]` to evaluate)"))
    if training and recipe.optim is None:
        problems.append(
            Problem("optim", "training needs an optimizer", 'e.g. optim = {_component_ = "adamw", lr = 1e-3}')
        )
    if recipe.model is None:
        problems.append(Problem("model", "missing: the recipe needs a `[model]` component"))
    import signal

    for i, s in enumerate(ck.signals):
        if s is None:
            continue
        if not isinstance(getattr(signal, s, None), signal.Signals):
            problems.append(Problem(f"checkpoint.signals[{i}]", f"unknown signal `{s}`", "e.g. SIGTERM or SIGUSR1"))
        elif s in ("SIGKILL", "SIGSTOP"):
            problems.append(Problem(f"checkpoint.signals[{i}]", f"`{s}` cannot be caught", "e.g. SIGTERM or SIGUSR1"))
    from accelengine.callbacks.trackers import log_section_problems

    problems += log_section_problems(recipe.log)


def _check_components(recipe: Recipe, problems: list[Problem]) -> None:
    # (key, component, arguments the engine supplies, how many of those it passes by position)
    targets: list[tuple[str, ComponentSpec | None, tuple[str, ...], int]] = [
        ("engine", recipe.engine, RUNTIME_ARGS["engine"], 0),
        ("model", recipe.model, (), 0),
        ("loss", recipe.loss, (), 0),
        ("optim", recipe.optim, RUNTIME_ARGS["optim"], 1),
        ("scheduler", recipe.scheduler, RUNTIME_ARGS["scheduler"], 1),
    ]
    targets += [(f"metrics.{k}", v, (), 0) for k, v in recipe.metrics.items()]
    targets += [(f"callbacks[{i}]", v, (), 0) for i, v in enumerate(recipe.callbacks)]
    targets += [(f"data.{k}.dataset", v.dataset, (), 0) for k, v in recipe.data.loaders.items()]
    for path, spec, runtime, positional in targets:
        if spec is not None:
            obj = check_component(spec, path, runtime, problems, positional=positional)
            if path == "engine" and isinstance(obj, type) and not _is_engine_class(obj):
                problems.append(
                    Problem(f"engine.{COMPONENT_KEY}", f"`{spec.target}` is not accelengine.Engine or a subclass of it")
                )


def _is_engine_class(cls: type) -> bool:
    # by name along the class's bases: importing the engine (torch, accelerate) only to validate is not needed
    return any(c.__module__ == "accelengine.engine" and c.__qualname__ == "Engine" for c in cls.__mro__)


def validate(data: dict[str, Any], source: str = "", recipe_dir: Path | None = None) -> Recipe:
    """Validate a parsed recipe dict; raises RecipeError listing every problem found."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        raise RecipeError(Problem("", "a recipe must be a TOML table"), source)
    sweeps = _sweep_keys(data)
    session = [f"sweep axes ({', '.join(f'`{k}`' for k in sweeps)})"] if sweeps else []
    if "sweep" in data:  # what `accelengine sweep` reads and takes out; never a key of one run's recipe
        session.append("`[sweep]`")
    if session:
        verb = "is" if session == ["`[sweep]`"] else "are"
        where = sweeps[0] if sweeps else "sweep"
        problems.append(
            Problem(where, f"{' and '.join(session)} {verb} for sessions", "run it with `accelengine sweep` instead")
        )
        raise RecipeError(problems, source)
    recipe = build_section(Recipe, data, "", problems)
    reported = len(problems)
    _cross_checks(recipe, problems)
    ensure_import_paths(recipe_dir)
    _check_components(recipe, problems)
    if problems:
        raise RecipeError(_said_once(problems, reported), source)
    return recipe


def _said_once(problems: list[Problem], reported: int) -> list[Problem]:
    """A key that was wrong already reads as "missing" to the later checks: say it once. A later problem is dropped
    when its key is one the first `reported` problems name, or the key an earlier "did you mean" points to (`epoch`
    for `epochs` makes "set exactly one of epochs and steps" an echo of the typo)."""
    named = _named(problems[:reported])
    kept = []
    for i, problem in enumerate(problems):
        if i >= reported and problem.path in named:
            continue
        kept.append(problem)
        named |= _named([problem]) - {problem.path}  # a check may name its own key twice, e.g. `data`
    return kept


def _named(problems: list[Problem]) -> set[str]:
    """The keys `problems` are about: their own, and the key each "did you mean" points to."""
    named = set()
    for problem in problems:
        named.add(problem.path)
        meant = re.fullmatch(r"did you mean `(\w+)`\?", problem.hint)
        if meant:
            parent, _, _ = problem.path.rpartition(".")
            named.add(f"{parent}.{meant[1]}" if parent else meant[1])
    return named


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. The default `name` is the file's (`name_from_file`)."""
    path = Path(path)
    data = load_toml(path)
    data.setdefault("name", name_from_file(path))
    apply_overrides(data, overrides or [])
    return validate(data, str(path), recipe_folder(path))


def recipe_folder(path: str | Path) -> Path:
    """Where a recipe's own modules (and `log.copy_code` globs) are found: the recipe's folder, or, for the resolved
    `recipe.toml` a run directory holds, the folder of the recipe it was resolved from (the run's `env.json` records
    it as `recipe_dir`), so that `accelengine run RUN_DIR/recipe.toml` runs again as it did."""
    folder = Path(path).resolve().parent
    try:
        recorded = json.loads((folder / "env.json").read_text(encoding="utf-8")).get("recipe_dir")
    except (OSError, ValueError, AttributeError):
        return folder
    return Path(recorded) if isinstance(recorded, str) and Path(recorded).is_dir() else folder


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe (every default filled in) as plain TOML-ready data."""

    def convert(value: Any) -> Any:
        if isinstance(value, ComponentSpec):
            return value.to_dict()
        if dataclasses.is_dataclass(value):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(value):
                v = convert(getattr(value, f.name))
                if f.metadata.get("flatten"):
                    out.update(v)
                else:
                    out[f.name] = v
            return out
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return convert(recipe)


__all__ = ["DataSection", "LoaderSection", "Recipe", "build_section", "load_recipe", "recipe_to_dict", "validate"]
