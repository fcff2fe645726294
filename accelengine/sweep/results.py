"""The results table of a session: one row per experiment, read back from each experiment's run directory, written
as `results.csv` (for tools) and `results.md` (for people) after every experiment that finishes."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelengine.recipe.toml_io import format_value
from accelengine.rundir import read_json, summary_is_stale
from accelengine.sweep.expand import Experiment, show

DONE = ("completed", "stopped")  # statuses a resumed session does not run again
_EXCEPTION_LINE = re.compile(r"^(error:|[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b)")
_ATTEMPT_HEADER = re.compile(r"^### \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d ")  # `launch.log_header`


@dataclass
class Row:
    """What is known about one experiment: its swept values, and its outcome once it ran."""

    index: int
    name: str
    overrides: dict[str, Any]
    status: str = "pending"
    final: dict[str, Any] = field(default_factory=dict)
    best: float | None = None
    best_step: int | None = None
    wall_time_s: float | None = None
    error: str = ""
    is_best: bool = False

    @property
    def done(self) -> bool:
        return self.status in DONE


def n_experiments(count: int) -> str:
    return f"{count} experiment" + ("" if count == 1 else "s")


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def best_of(metrics_path: Path, metric: str, mode: str) -> tuple[float | None, int | None]:
    """The best value of `metric` over the evaluation records of a `metrics.jsonl`, and its step."""
    best: float | None = None
    step = None
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None, None
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        value = _number(record.get(metric)) if isinstance(record, dict) else None
        if value is not None and (best is None or (value > best if mode == "max" else value < best)):
            best, step = value, record.get("step")
    return best, step


def error_from_log(log: Path, lines: int = 1) -> str:
    """The line of a console log that says what went wrong in the latest attempt (the log holds every attempt, each
    after its `### <time> <command>` header): its last exception or `error:` line, else its last line."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    headers = [i for i, t in enumerate(text) if _ATTEMPT_HEADER.match(t)]
    text = [t.strip() for t in text[headers[-1] + 1 if headers else 0 :] if t.strip()]
    for i in range(len(text) - 1, -1, -1):
        if _EXCEPTION_LINE.match(text[i]):
            return " / ".join(text[i : i + lines])
    return " / ".join(text[-lines:])


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").rstrip().splitlines()[-lines:])
    except OSError:
        return ""


def read_row(row: Row, exp_dir: Path, metric: str | None, mode: str, current: bool | None = None) -> Row:
    """Fill `row` from the experiment's directory: the outcome its summary records when that summary is the latest
    attempt's, else `partial` (started: killed, or crashed before training) or `pending`; and the best value of
    `metric` in its metrics (so far, for an unfinished run).

    `current` says whether `summary.json` is the latest attempt's, when the caller knows (the session watched the
    attempt); by default `summary_is_stale` decides. An earlier attempt's summary is not the experiment's result: the
    row gets no final values and is not ranked; its `error` names the earlier outcome."""
    summary = read_json(exp_dir / "summary.json")
    if current is None:
        current = not summary_is_stale(exp_dir)
    row.final, row.wall_time_s, row.error = {}, None, ""
    if isinstance(summary, dict) and current:
        row.status = str(summary.get("status", "unknown"))
        row.final = dict(summary.get("final") or {})
        row.wall_time_s = _number(summary.get("wall_time_s"))
        row.error = "" if row.done else str(summary.get("stop_reason") or "")
    else:  # started but no summary of its own: killed, or it crashed before training began
        started = any((exp_dir / f).exists() for f in ("env.json", "metrics.jsonl", "console.log"))
        row.status = "partial" if started else "pending"
        if isinstance(summary, dict):
            earlier = summary.get("status", "unknown")
            row.error = f"its latest attempt ended without a summary (an earlier attempt's says `{earlier}`)"
    if metric:
        row.best, row.best_step = best_of(exp_dir / "metrics.jsonl", metric, mode)
    return row


def mark_best(rows: list[Row], mode: str) -> Row | None:
    """Mark the finished experiment with the best value (ties: the lower index) and return it."""
    ranked = [r for r in rows if r.done and r.best is not None]
    for r in rows:
        r.is_best = False
    if not ranked:
        return None
    best = (
        max(ranked, key=lambda r: (r.best, -r.index)) if mode == "max" else min(ranked, key=lambda r: (r.best, r.index))
    )
    best.is_best = True
    return best


def _columns(rows: list[Row], metric: str | None) -> tuple[list[str], list[str]]:
    swept = list(dict.fromkeys(k for r in rows for k in r.overrides))
    finals = list(dict.fromkeys(k for r in rows for k in r.final))
    if metric in finals:
        finals.remove(metric)
        finals.insert(0, metric)
    return swept, finals


def _cell(value: Any, exact: bool) -> str:
    """A table cell: exact values (TOML spelling) for the CSV, shortened ones for people."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not exact:
        return show(value)
    try:
        return format_value(value)
    except TypeError:
        return str(value)


def to_csv(rows: list[Row], metric: str | None) -> str:
    swept, finals = _columns(rows, metric)
    head = ["index", "experiment", *swept, "status", "best"]
    head += [f"best {metric}", "best step"] if metric else []
    head += [f"final {k}" for k in finals] + ["wall_time_s", "error"]
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(head)
    for r in rows:
        line = [
            r.index,
            r.name,
            *(_cell(r.overrides.get(k), True) for k in swept),
            r.status,
            "yes" if r.is_best else "",
        ]
        line += [_cell(r.best, True), _cell(r.best_step, True)] if metric else []
        line += [_cell(r.final.get(k), True) for k in finals] + [_cell(r.wall_time_s, True), r.error]
        out.writerow(line)
    return buf.getvalue()


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[Row], session: str, session_dir: Path, metric: str | None, mode: str) -> str:
    swept, finals = _columns(rows, metric)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    best = next((r for r in rows if r.is_best), None)
    out = [
        f"# Session `{session}`",
        "",
        f"{n_experiments(len(rows))}: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
    ]
    if metric is None:
        out.append("No metric to rank by: set `metric` (and `mode`) in `[sweep]` to mark the best experiment.")
    elif best is None:
        out.append(f"No finished experiment has logged `{metric}` yet.")
    else:
        out.append(f"Best by `{metric}` ({mode}, best evaluation of each run): **{best.name}** ({best.best:.4g}).")
    head = ["", "#", "experiment", *swept, "status"]
    head += [f"best {metric}", "step"] if metric else []
    head += [f"final {k}" for k in finals] + ["wall s", "error"]
    out += ["", "| " + " | ".join(_md(h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        line = [
            "**best**" if r.is_best else "",
            str(r.index),
            r.name,
            *(_cell(r.overrides.get(k), False) for k in swept),
        ]
        line += [r.status] + ([_cell(r.best, False), _cell(r.best_step, False)] if metric else [])
        line += [_cell(r.final.get(k), False) for k in finals] + [_cell(r.wall_time_s, False), r.error[:160]]
        out.append("| " + " | ".join(_md(c) for c in line) + " |")
    example = best or rows[0]
    run_dir = session_dir / "experiments" / example.name
    out += ["", f"Run one experiment again alone: `accelengine run {run_dir}/recipe.toml --out {run_dir}`"]
    failures = [r for r in rows if r.status not in (*DONE, "pending", "running", "partial")]
    for r in failures:
        out += [
            "",
            f"## {r.name}: {r.status}",
            "",
            "```",
            tail(session_dir / "experiments" / r.name / "console.log"),
            "```",
        ]
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")  # temp file + rename: a killed session never leaves half a table
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_tables(session_dir: Path, session: str, rows: list[Row], metric: str | None, mode: str) -> Row | None:
    """Rank, then write `results.csv` and `results.md`; returns the best row."""
    best = mark_best(rows, mode)
    _write(session_dir / "results.csv", to_csv(rows, metric))
    _write(session_dir / "results.md", to_markdown(rows, session, session_dir, metric, mode))
    return best


def new_rows(experiments: list[Experiment]) -> list[Row]:
    """One `pending` row per experiment."""
    return [Row(e.index, e.name, dict(e.overrides)) for e in experiments]


__all__ = [
    "DONE",
    "Row",
    "best_of",
    "error_from_log",
    "mark_best",
    "new_rows",
    "read_row",
    "write_tables",
]
