"""Components named in a recipe: a dotted path or a short built-in name, plus keyword arguments.

A component table is `{_component_ = "torch.optim.AdamW", lr = 1e-3}`; a bare string `"adamw"` is the same with no
arguments. Arguments the engine supplies at run time (the model's parameters for an optimizer, the optimizer for a
scheduler) are named per section and must not be written in the recipe.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelengine.errors import Problem

COMPONENT_KEY = "_component_"

# Short names users may write instead of a dotted path.
BUILTINS: dict[str, str] = {
    # engine
    "engine": "accelengine.engine.Engine",
    # models
    "mlp": "accelengine.models.MLP",
    # losses
    "cross_entropy": "torch.nn.CrossEntropyLoss",
    "mse": "torch.nn.MSELoss",
    "l1": "torch.nn.L1Loss",
    "bce_with_logits": "torch.nn.BCEWithLogitsLoss",
    # optimizers
    "sgd": "torch.optim.SGD",
    "adam": "torch.optim.Adam",
    "adamw": "torch.optim.AdamW",
    "rmsprop": "torch.optim.RMSprop",
    # schedulers
    "cosine": "accelengine.schedules.cosine",
    "linear": "accelengine.schedules.linear",
    "constant": "accelengine.schedules.constant",
    "step_lr": "torch.optim.lr_scheduler.StepLR",
    # metrics
    "accuracy": "accelengine.metrics.Accuracy",
    "mean_loss": "accelengine.metrics.MeanLoss",
    # data
    "files": "accelengine.data.from_files",
    "digits": "accelengine.examples.digits.digits",
    "synthetic_classification": "accelengine.examples.synthetic.classification",
    # callbacks (`[[callbacks]]` tables); run_files .. run_summary form the default set, switched by `[log]`
    "run_files": "accelengine.callbacks.run_files.RunFiles",
    "metrics_writer": "accelengine.callbacks.metrics_writer.MetricsWriter",
    "console": "accelengine.callbacks.console.ConsoleLogger",
    "progress": "accelengine.callbacks.progress.ProgressBar",
    "trackers": "accelengine.callbacks.trackers.Trackers",
    "param_table": "accelengine.callbacks.param_table.ParamTable",
    "nan_guard": "accelengine.callbacks.nan_guard.NanGuard",
    "run_summary": "accelengine.callbacks.run_summary.RunSummary",
    "lr_monitor": "accelengine.callbacks.lr_monitor.LearningRateMonitor",
    "grad_norm": "accelengine.callbacks.grad_norm.GradNormMonitor",
    "throughput": "accelengine.callbacks.throughput.ThroughputMonitor",
    "early_stopping": "accelengine.callbacks.early_stopping.EarlyStopping",
    "time_limit": "accelengine.callbacks.time_limit.TimeLimit",
    "ema": "accelengine.callbacks.ema.EMA",
}


@dataclass
class ComponentSpec:
    """A validated component: what to build (`target`) and with which recipe arguments."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    written_as_string: bool = False

    def to_dict(self) -> dict[str, Any] | str:
        if self.written_as_string and not self.kwargs:
            return self.target
        return {COMPONENT_KEY: self.target, **{k: _unspec(v) for k, v in self.kwargs.items()}}


def _unspec(v: Any) -> Any:
    if isinstance(v, ComponentSpec):
        return v.to_dict()
    if isinstance(v, dict):
        return {k: _unspec(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unspec(x) for x in v]
    return v


def ensure_import_paths(recipe_dir: Path | None = None) -> None:
    """User components live in modules beside the recipe or in the working directory: make both importable."""
    for p in (Path.cwd(), recipe_dir):
        if p is not None and str(p) not in sys.path:
            sys.path.insert(0, str(p))


class ModuleFailedError(ImportError):
    """The module a component's path names exists, but its code raised while it was imported (a syntax error, a
    name error at top level, a missing dependency), or while the named object was looked up in it (a lazy module's
    `__getattr__`): a mistake in that module, not in the recipe's path."""

    def __init__(self, module: str, error: Exception) -> None:
        self.module = module
        self.error = error
        super().__init__(f"importing `{module}` failed: {type(error).__name__}: {_failure(error)}")


def _failure(error: Exception) -> str:
    """What went wrong and where: a syntax error's own file, line and text; otherwise the innermost frame of the
    traceback outside Python's import machinery (the line of the module's code that raised)."""
    if isinstance(error, SyntaxError):
        where = f" at {error.filename}, line {error.lineno}" if error.filename else ""
        text = f": `{error.text.strip()}`" if error.text and error.text.strip() else ""
        return f"{error.msg}{where}{text}"
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith("<frozen ")]
    where = f"(at {frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return " ".join(part for part in (str(error), where) if part)


def resolve(target: str) -> Any:
    """Import the object a dotted path (or a built-in short name) names. Raises ImportError/AttributeError when there
    is no such object, and ModuleFailedError (an ImportError) when its module raises while it is imported or while
    the object is looked up in it."""
    dotted = BUILTINS.get(target, target)
    parts = dotted.split(".")
    if len(parts) < 2 or not _is_dotted(dotted):  # also `.`, `a..b`, `pkg.9x`
        raise ImportError(f"`{target}` is neither a built-in name nor a dotted path like `package.module.Name`")
    # walk back until a module imports, so `torch.nn.CrossEntropyLoss` and `pkg.mod.Class.method` both work
    for cut in range(len(parts) - 1, 0, -1):
        tried = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(tried)
        except ModuleNotFoundError as err:
            if err.name and not (tried == err.name or tried.startswith(err.name + ".")):
                raise ModuleFailedError(tried, err) from err  # a missing dependency *inside* the module: name it
            continue
        except Exception as err:  # the module's own code failed; KeyboardInterrupt and SystemExit are not caught
            raise ModuleFailedError(tried, err) from err
        for depth, name in enumerate(parts[cut:], start=cut + 1):
            try:
                obj = getattr(obj, name)
            except AttributeError:
                raise
            except Exception as err:  # a lazy attribute (a module's `__getattr__`, a descriptor) whose code failed
                raise ModuleFailedError(".".join(parts[:depth]), err) from err
        return obj
    raise ImportError(f"no module named `{parts[0]}`")


def _is_dotted(name: str) -> bool:
    """`package.module.Name` or `module`: identifiers joined by single dots (what `import_module` accepts)."""
    return all(part.isidentifier() for part in name.split("."))


# Long spellings users type for short parameter names, so `lerning_rate` still finds `lr`.
_LONG_FORMS = {"lr": "learning_rate", "wd": "weight_decay", "eps": "epsilon", "betas": "beta"}


def _suggest(word: str, choices: list[str]) -> str:
    """`did you mean ...?` for the closest choice, or an empty string."""
    spelled = {_LONG_FORMS.get(c, c): c for c in choices} | {c: c for c in choices}
    close = difflib.get_close_matches(word, list(spelled), n=1, cutoff=0.6)
    return f"did you mean `{spelled[close[0]]}`?" if close else ""


def check_component(
    spec: ComponentSpec,
    path: str,
    runtime_args: tuple[str, ...],
    problems: list[Problem],
    *,
    call: bool = True,
    positional: int = 0,
) -> Any:
    """Import the target and bind the recipe's keyword arguments against its signature, recording every problem.

    `runtime_args` are supplied by the engine; they must not appear in the recipe, and count as given. The first
    `positional` of them are passed by position (an optimizer's parameters, a scheduler's optimizer): they stand for
    the target's first positional parameters, whatever those are called. Returns the resolved object, or None when
    it cannot be imported.
    """
    obj = _check_target(spec, path, runtime_args, problems, call=call, positional=positional)
    # a component given as another's argument is its own part of the recipe: checked even when the outer one fails
    for key, value in spec.kwargs.items():
        for sub_path, sub in _nested_specs(value, f"{path}.{key}"):
            check_component(sub, sub_path, (), problems)
    return obj


def _check_target(
    spec: ComponentSpec,
    path: str,
    runtime_args: tuple[str, ...],
    problems: list[Problem],
    *,
    call: bool,
    positional: int,
) -> Any:
    try:
        obj = resolve(spec.target)
    except ModuleFailedError as err:
        missing = err.error.name if isinstance(err.error, ModuleNotFoundError) else None
        hint = f"install `{missing}`, or fix the import" if missing else "fix the module's code"
        problems.append(Problem(f"{path}.{COMPONENT_KEY}", f"cannot import `{spec.target}`: {err}", hint))
        return None
    except (ImportError, AttributeError) as err:
        hint = _suggest(spec.target, list(BUILTINS))
        module_name, _, attr = spec.target.rpartition(".")
        if not hint and _is_dotted(module_name):
            try:
                module = importlib.import_module(module_name)
                hint = _suggest(attr, [n for n in dir(module) if not n.startswith("_")])
                hint = hint.replace("`", f"`{module_name}.", 1) if hint else ""
            except ImportError:
                pass
        hint = hint or "use a built-in name (see the recipe reference) or a dotted path to an importable object"
        problems.append(Problem(f"{path}.{COMPONENT_KEY}", f"cannot import `{spec.target}`: {err}", hint))
        return None
    if not callable(obj):
        problems.append(Problem(f"{path}.{COMPONENT_KEY}", f"`{spec.target}` is not callable"))
        return None
    if not call:
        return obj
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = None  # builtins without a signature: only the run-time arguments are checked
    if params is not None and positional:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        first = [n for n, p in params.items() if p.kind in kinds][:positional]
        if len(first) < positional and not any(p.kind is p.VAR_POSITIONAL for p in params.values()):
            what = " and ".join(f"`{n}`" for n in runtime_args[:positional])
            problems.append(
                Problem(
                    f"{path}.{COMPONENT_KEY}",
                    f"`{spec.target}` takes no positional argument for the {what} the engine passes",
                    "name a callable whose first parameter receives it",
                )
            )
        runtime_args = (*first, *runtime_args[len(first) :])
    for name in runtime_args:
        if name in spec.kwargs:
            problems.append(
                Problem(
                    f"{path}.{name}", f"`{name}` is supplied by the engine at run time", "remove it from the recipe"
                )
            )
    if params is None:
        return obj
    takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    # a recipe passes its arguments by keyword, and so does the engine all but the first `positional` of its own:
    # a parameter before `/` in the signature can be given neither way
    by_position_only = [n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY]
    by_keyword = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in runtime_args[positional:]:
        if name in by_position_only:
            problems.append(
                Problem(
                    f"{path}.{COMPONENT_KEY}",
                    f"`{name}` is positional-only in `{spec.target}` (before `/`); the engine passes it by keyword",
                    f"name a callable that accepts `{name}` by keyword",
                )
            )
    for key in spec.kwargs:
        if key in runtime_args:
            continue  # reported above
        if key in by_position_only:
            problems.append(
                Problem(
                    f"{path}.{key}",
                    f"`{key}` is positional-only in `{spec.target}` (before `/`); a recipe passes arguments by keyword",
                    f"wrap `{spec.target}` in a function that takes `{key}` by keyword",
                )
            )
        elif key not in params and not takes_var_kw:
            accepted = [n for n in by_keyword if n not in runtime_args]
            hint = _suggest(key, accepted) or "it accepts " + (", ".join(f"`{n}`" for n in accepted) or "no arguments")
            problems.append(Problem(f"{path}.{key}", f"unknown key `{path}.{key}` for `{spec.target}`", hint))
    for name, p in params.items():
        if p.default is not p.empty or name in spec.kwargs or name in runtime_args:
            continue
        if name in by_keyword:
            problems.append(Problem(f"{path}.{name}", f"missing required argument `{name}` of `{spec.target}`"))
        elif name in by_position_only:
            problems.append(
                Problem(
                    f"{path}.{COMPONENT_KEY}",
                    f"`{spec.target}` requires the positional-only argument `{name}` (before `/`); a recipe "
                    "passes arguments by keyword",
                    f"wrap `{spec.target}` in a function that takes `{name}` by keyword",
                )
            )
    return obj


def _nested_specs(value: Any, path: str):
    if isinstance(value, ComponentSpec):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _nested_specs(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nested_specs(v, f"{path}[{i}]")


def instantiate(spec: ComponentSpec, *args: Any, **runtime: Any) -> Any:
    """Build a component: nested component tables first, then the target with recipe and runtime arguments."""
    obj = resolve(spec.target)
    kwargs = {k: _build(v) for k, v in spec.kwargs.items()}
    if "total_steps" in runtime:
        # offered to any component that declares it (LR schedules); dropped for the rest
        total = runtime.pop("total_steps")
        try:
            if "total_steps" in inspect.signature(obj).parameters and "total_steps" not in kwargs:
                kwargs["total_steps"] = total
        except (TypeError, ValueError):
            pass
    return obj(*args, **kwargs, **runtime)


def _build(value: Any) -> Any:
    if isinstance(value, ComponentSpec):
        return instantiate(value)
    if isinstance(value, dict):
        return {k: _build(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v) for v in value]
    return value


def parse_component(value: Any, path: str, problems: list[Problem]) -> ComponentSpec | None:
    """A recipe value -> ComponentSpec (syntax only; `check_component` does imports and signatures)."""
    if isinstance(value, str):
        if not value:
            problems.append(Problem(path, "empty component name"))
            return None
        return ComponentSpec(value, {}, written_as_string=True)
    if not isinstance(value, dict):
        problems.append(
            Problem(path, f"expected a component (a table with `{COMPONENT_KEY}`, or a name), got {type_name(value)}")
        )
        return None
    if COMPONENT_KEY not in value:
        hint = _suggest(COMPONENT_KEY, list(value)) or f'add `{COMPONENT_KEY} = "package.module.Name"`'
        problems.append(Problem(path, f"a component table needs a `{COMPONENT_KEY}` key", hint))
        return None
    target = value[COMPONENT_KEY]
    if not isinstance(target, str) or not target:
        problems.append(Problem(f"{path}.{COMPONENT_KEY}", f"expected a dotted path string, got {type_name(target)}"))
        return None
    kwargs = {k: _parse_nested(v, f"{path}.{k}", problems) for k, v in value.items() if k != COMPONENT_KEY}
    return ComponentSpec(target, kwargs)


def _parse_nested(value: Any, path: str, problems: list[Problem]) -> Any:
    if isinstance(value, dict):
        if COMPONENT_KEY in value:
            return parse_component(value, path, problems)
        return {k: _parse_nested(v, f"{path}.{k}", problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_parse_nested(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)
