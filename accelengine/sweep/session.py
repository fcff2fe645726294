"""A session on disk, and running it: validate every experiment, lay out the directory, skip what is done, run the
rest, keep the results table current.

    <session dir>/
        session.toml        the session recipe, as given
        sweep.json          the experiment list (what a re-run checks it would expand to the same experiments)
        results.csv/.md     one row per experiment, rewritten whenever one finishes
        experiments/<index>-<slug>/   a complete run directory each (recipe.toml, metrics.jsonl, summary.json...)
                                      plus console.log, the experiment's output
        slurm/              submitit's job files (with --launcher slurm)
"""

from __future__ import annotations

import datetime as _dt
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelengine.callbacks.progress import metric_mode
from accelengine.errors import Problem, RecipeError
from accelengine.recipe.toml_io import apply_overrides, dump_toml, load_toml
from accelengine.recipe.validate import name_from_file
from accelengine.rundir import default_run_dir, read_json, write_json
from accelengine.sweep.expand import Experiment, SweepConfig, parse_session, show, validate_experiments
from accelengine.sweep.launch import STOPPED, Task, experiment_command, experiment_env, run_local
from accelengine.sweep.results import Row, error_from_log, n_experiments, new_rows, read_row, write_tables

SESSION_FILE = "session.toml"
MANIFEST = "sweep.json"
EXPERIMENTS = "experiments"
LAUNCHERS = ("local", "slurm")

Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


@dataclass
class Session:
    """A session recipe, expanded and validated: nothing has run and nothing is written yet."""

    name: str
    path: Path
    text: str  # the recipe as given, copied into the session directory
    overrides: list[str]
    config: SweepConfig
    experiments: list[Experiment]
    resolved: list[dict[str, Any]]  # each experiment's validated recipe with every default filled in
    metric: str | None
    mode: str
    recipe_dir: Path  # where the recipe's own modules are imported from: the folder of the recipe first given


@dataclass
class SessionResult:
    """What `run_session` returns: the session directory and one row per experiment."""

    dir: Path
    rows: list[Row]
    metric: str | None
    mode: str

    @property
    def best(self) -> Row | None:
        return next((r for r in self.rows if r.is_best), None)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.done]

    @property
    def ok(self) -> bool:
        return not self.failed


def _ranking(config: SweepConfig, first: dict[str, Any], source: str) -> tuple[str | None, str]:
    """The metric and mode that pick the best experiment: `[sweep]`'s metric, else the recipe's checkpoint monitor;
    the mode given with it, else the one its name says. A name that says nothing is an error, not a guess: ranked the
    wrong way, the table would crown the worst experiment."""
    checkpoint = first.get("checkpoint") or {}
    metric = config.metric or checkpoint.get("monitor")
    if metric is None:
        return None, config.mode or "max"
    # `checkpoint.mode` when the recipe sets it: unset, validation has checked that the name says
    mode = config.mode or (checkpoint.get("mode") if metric == checkpoint.get("monitor") else None)
    mode = mode or metric_mode(metric)
    if mode is None:
        where = "`[sweep] metric`" if config.metric else "`checkpoint.monitor`"
        hint = 'set `mode = "min"` or `mode = "max"` in `[sweep]`, or `--set sweep.mode=min` on the command line'
        message = f"cannot tell whether a smaller or a larger `{metric}` ({where}) is better"
        raise RecipeError(Problem("sweep.mode", message, hint), source)
    return metric, mode


def load_session(
    path: str | Path,
    overrides: list[str] | None = None,
    recipe_dir: str | Path | None = None,
    default_name: str | None = None,
) -> Session:
    """Read, override, expand and validate a session recipe. Raises RecipeError listing every problem.

    `recipe_dir` is where components named by the recipe's own modules are found, and `default_name` the session's
    name when the recipe gives none (defaults: the recipe's folder and file name; a session directory's copy of the
    recipe keeps those of the original)."""
    path = Path(path)
    recipe_dir = Path(recipe_dir) if recipe_dir is not None else path.resolve().parent
    default_name = default_name or name_from_file(path)
    data = load_toml(path)
    text = path.read_text(encoding="utf-8")
    # after the overrides: `--set 'name_=[...]'` sweeps the names of a recipe that gives none, it does not clash
    apply_overrides(data, list(overrides or []))
    if "name" not in data and "name_" not in data:  # `name_ = [...]` sweeps the runs' names
        data["name"] = default_name
    config, experiments = parse_session(data, str(path))
    resolved = validate_experiments(experiments, str(path), recipe_dir)
    metric, mode = _ranking(config, experiments[0].recipe, str(path))
    name = data["name"] if isinstance(data.get("name"), str) else default_name
    return Session(name, path, text, list(overrides or []), config, experiments, resolved, metric, mode, recipe_dir)


def _target(
    path: str | Path, out: str | Path | None, overrides: list[str] | None
) -> tuple[Path, Path | None, list, Path | None, str | None]:
    """(recipe, output directory, overrides, recipe folder, session name): a session directory stands for its own
    recipe, directory, `--set` overrides, the folder its recipe came from and its name (`accelengine sweep DIR`)."""
    path = Path(path)
    if not path.is_dir():
        return path, Path(out) if out is not None else None, list(overrides or []), None, None
    stored = read_json(path / MANIFEST)
    if not (path / SESSION_FILE).is_file() or not isinstance(stored, dict):
        hint = f"give a session recipe, or a directory made by `accelengine sweep` (with {SESSION_FILE})"
        raise RecipeError(Problem("", f"`{path}` is a directory but not a session directory", hint))
    given = Path(out) if out is not None else path
    overrides = list(overrides) if overrides else list(stored.get("overrides", []))
    recipe_dir = stored.get("recipe_dir")  # absent in sessions started before it was recorded: the directory itself
    # a recipe without `name` is named after its file, which the copy is not: its runs must keep the original's name
    name = stored.get("session")
    return (
        path / SESSION_FILE,
        given,
        overrides,
        Path(recipe_dir) if isinstance(recipe_dir, str) else None,
        name if isinstance(name, str) else None,
    )


def _experiment_list(experiments: list[Experiment]) -> list[dict[str, Any]]:
    # through JSON so it compares equal to what sweep.json stores (tuples as lists and so on)
    return json.loads(json.dumps([{"index": e.index, "name": e.name, "overrides": e.overrides} for e in experiments]))


def _check_existing(session_dir: Path, session: Session) -> dict[str, Any] | None:
    """The stored manifest when `session_dir` is this session started before; None for a new directory. Refuses a
    directory that holds something else, or a session whose recipe now expands to other experiments."""
    if not session_dir.exists() or (session_dir.is_dir() and not any(session_dir.iterdir())):
        return None
    stored = read_json(session_dir / MANIFEST)
    if not isinstance(stored, dict) or not isinstance(stored.get("experiments"), list):
        hint = "choose another --out, or leave it out for runs/<name>/<timestamp>"
        raise RecipeError(Problem("", f"`{session_dir}` exists and is not a session directory (no {MANIFEST})", hint))
    old, new = stored["experiments"], _experiment_list(session.experiments)
    if old == new:
        return stored
    if len(old) != len(new):
        why = f"it holds {len(old)} experiments, the recipe now makes {len(new)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b)
        label = ", ".join(f"{k}={show(v)}" for k, v in old[i]["overrides"].items())
        why = f"experiment {i} was [{label}], the recipe now makes [{session.experiments[i].label}]"
    hint = f"re-run with the recipe it was started with ({session_dir / SESSION_FILE}), or use another --out"
    raise RecipeError(Problem("", f"`{session_dir}` is a different session: {why}", hint), str(session.path))


def _write_session(session_dir: Path, session: Session, stored: dict[str, Any] | None, echo: Echo) -> None:
    session_dir.mkdir(parents=True, exist_ok=True)
    copy = session_dir / SESSION_FILE
    if copy.is_file() and copy.read_text(encoding="utf-8") != session.text:
        echo(
            f"note: {session.path} differs from {copy} but makes the same experiments; unfinished experiments run "
            "with the new recipe, and the copy is updated"
        )
    copy.write_text(session.text, encoding="utf-8")
    now = _dt.datetime.now().isoformat(timespec="seconds")
    manifest = {
        "session": session.name,
        "created": (stored or {}).get("created", now),
        "updated": now,
        "command": sys.argv,
        "overrides": session.overrides,
        "recipe_dir": str(session.recipe_dir),
        "metric": session.metric,
        "mode": session.mode,
        "experiments": _experiment_list(session.experiments),
    }
    write_json(session_dir / MANIFEST, manifest)


def _write_recipe(exp_dir: Path, session: Session, exp: Experiment) -> Path:
    exp_dir.mkdir(parents=True, exist_ok=True)
    header = (
        f"experiment {exp.index} of session `{session.name}`: {exp.label}\n"
        f"run it alone with: accelengine run {exp_dir}/recipe.toml --out {exp_dir}"
    )
    recipe = exp_dir / "recipe.toml"
    recipe.write_text(dump_toml(session.resolved[exp.index], header), encoding="utf-8")
    return recipe


def _summary_stamp(exp_dir: Path) -> int | None:
    try:
        return (exp_dir / "summary.json").stat().st_mtime_ns
    except OSError:
        return None


def _killed_by(code: int | None) -> str:
    """`killed by SIGKILL` for a process a signal ended: its log's last line is whatever it printed last, no error."""
    if code is None or code >= 0:
        return ""
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _import_slurm() -> Any:
    try:
        from accelengine.sweep import slurm
    except ImportError as err:
        if err.name != "submitit":
            raise
        hint = "pip install 'accelengine[slurm]'"
        raise RecipeError(Problem("", "`--launcher slurm` needs submitit, which is not installed", hint)) from None
    return slurm


class _Progress:
    """Keeps the rows, the results table and the console up to date as experiments start and finish."""

    def __init__(self, session: Session, session_dir: Path, rows: list[Row], total: int, echo: Echo) -> None:
        self.session, self.dir, self.rows, self.total, self.echo = session, session_dir, rows, total, echo
        self.stamps: dict[int, int | None] = {}
        self.started: dict[int, float] = {}
        self.finished = 0

    def write(self) -> Row | None:
        return write_tables(self.dir, self.session.name, self.rows, self.session.metric, self.session.mode)

    def start(self, task: Task, note: str) -> None:
        # a summary.json already there is from an earlier attempt: only a newer one says how this attempt ended
        self.stamps[task.index], self.started[task.index] = _summary_stamp(task.dir), time.monotonic()
        self.rows[task.index].status, self.rows[task.index].error = "running", ""
        self.echo(f"start {task.name}" + (f" ({note})" if note else ""))
        self.write()

    def finish(self, task: Task, code: int | None, why: str) -> None:
        self.finished += 1
        row, metric = self.rows[task.index], self.session.metric
        fresh = _summary_stamp(task.dir) not in (None, self.stamps.get(task.index))
        read_row(row, task.dir, metric, self.session.mode, current=fresh)  # an older summary is not this attempt's
        if not fresh or (code not in (0, None) and row.done):
            row.status = "interrupted" if why == STOPPED else "failed"
            row.error = ""
        if not row.done and not row.error:
            row.error = why or _killed_by(code) or error_from_log(task.log) or f"exit code {code}"
        text = f"{row.status} after {time.monotonic() - self.started[task.index]:.1f}s"
        if row.error:
            text += f": {row.error[:200]}"
        elif metric and row.best is not None:
            last = row.final.get(metric)
            text += (f", {metric} {last:.4g}" if isinstance(last, float) else "") + f" (best {row.best:.4g})"
        self.echo(f"[{self.finished}/{self.total}] {task.name}: {text}")
        self.write()


def run_session(
    path: str | Path,
    out: str | Path | None = None,
    *,
    parallel: int = 1,
    launcher: str = "local",
    overrides: list[str] | None = None,
    echo: Echo = _print,
) -> SessionResult:
    """Run every experiment of a session recipe (or resume a session directory) and return the results.

    Experiments already completed in `out` are skipped, partial ones resumed on their directory. A failing
    experiment does not stop the others. Recipe mistakes, in any experiment, raise RecipeError before anything runs.
    """
    if not isinstance(parallel, int) or parallel < 1:
        raise RecipeError(Problem("", f"--parallel must be a positive number of experiments, got {parallel!r}"))
    if launcher not in LAUNCHERS:
        raise RecipeError(Problem("", f"unknown launcher `{launcher}`", "use `local` or `slurm`"))
    path, out_dir, overrides, recipe_dir, name = _target(path, out, overrides)
    session = load_session(path, overrides, recipe_dir, name)
    session_dir = out_dir if out_dir is not None else default_run_dir(session.name)
    stored = _check_existing(session_dir, session)
    slurm = None
    if launcher == "slurm":
        slurm = _import_slurm()
        slurm.executor_parameters(session.config.slurm, parallel, session.name)  # mistakes before anything is written
    _write_session(session_dir, session, stored, echo)

    metric, mode = session.metric, session.mode
    exp_dirs = [session_dir / EXPERIMENTS / e.name for e in session.experiments]
    rows = new_rows(session.experiments)
    for row, exp_dir in zip(rows, exp_dirs, strict=True):
        read_row(row, exp_dir, metric, mode)
    env = experiment_env(session.recipe_dir)
    tasks = []
    for exp, exp_dir, row in zip(session.experiments, exp_dirs, rows, strict=True):
        if not row.done:
            recipe = _write_recipe(exp_dir, session, exp)
            command = experiment_command(recipe.resolve(), exp_dir.resolve(), session.config.launch)
            tasks.append(Task(exp.index, exp.name, exp_dir, command, env))
    progress = _Progress(session, session_dir, rows, len(tasks), echo)
    progress.write()
    done = len(rows) - len(tasks)
    echo(
        f"session `{session.name}`: {n_experiments(len(rows))}"
        + (f", {done} already done" if done else "")
        + f", running {len(tasks)} ({launcher}"
        + (f", {parallel} at a time" if parallel > 1 else "")
        + f") -> {session_dir}"
    )

    try:
        if slurm is not None:
            folder, table = session_dir / "slurm", session.config.slurm
            slurm.run_slurm(tasks, folder, table, parallel, session.name, progress.start, progress.finish)
        else:
            run_local(tasks, parallel, progress.start, progress.finish)
    except KeyboardInterrupt:
        progress.write()
        echo(f"interrupted: run the same command again to resume (or `accelengine sweep {session_dir}`)")
        raise
    best = progress.write()
    failed = [r for r in rows if not r.done]
    echo(
        f"{len(rows) - len(failed)}/{len(rows)} experiments finished"
        + (f", {len(failed)} failed ({', '.join(r.name for r in failed)})" if failed else "")
        + (f"; best {best.name}: {metric} {best.best:.4g}" if best and best.best is not None else "")
        + f"\nresults: {session_dir / 'results.md'}"
    )
    return SessionResult(session_dir, rows, metric, mode)


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows])


def plan(path: str | Path, out: str | Path | None = None, overrides: list[str] | None = None) -> str:
    """The dry run: the experiments a session would run, as a table (with their status when `out` holds the
    session already). Validates every experiment; writes nothing."""
    path, out_dir, overrides, recipe_dir, name = _target(path, out, overrides)
    session = load_session(path, overrides, recipe_dir, name)
    rows = new_rows(session.experiments)
    existing = None
    if out_dir is not None:
        existing = _check_existing(out_dir, session)
        for row in rows:
            read_row(row, out_dir / EXPERIMENTS / row.name, None, session.mode)
    swept = list(dict.fromkeys(k for r in rows for k in r.overrides))
    head = ["#", "experiment", *swept] + (["status"] if existing else [])
    body = [
        [str(r.index), r.name, *(show(r.overrides.get(k, "")) for k in swept)] + ([r.status] if existing else [])
        for r in rows
    ]
    where = out_dir if out_dir is not None else Path("runs") / session.name / "<timestamp>"
    ranking = f"best by {session.metric} ({session.mode})" if session.metric else "no metric to rank by"
    title = f"session `{session.name}`: {n_experiments(len(rows))}, {ranking}, directory {where}"
    return f"{title}\n\n{_text_table(head, body)}\n"


__all__ = ["LAUNCHERS", "Session", "SessionResult", "load_session", "plan", "run_session"]
