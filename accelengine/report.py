"""`accelengine report PATH`: PNG plots of a run's `metrics.jsonl` (or several runs overlaid) and a short summary.

PATH is a run directory (it holds `metrics.jsonl`) or any directory below which several runs are, such as a sweep
session; each run is then one line per plot, labelled by its path relative to PATH. One figure per quantity
(`loss.png`, `lr.png`, `accuracy.png`, ...), with training and evaluation curves in separate panels, written to
`PATH/plots/`. matplotlib is an optional extra (`pip install 'accelengine[plot]'`), imported only here.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from accelengine.errors import EngineError
from accelengine.rundir import read_json, summary_is_stale

METRICS_FILE = "metrics.jsonl"
PLOT_DIR = "plots"
INSTALL_HINT = "plots need matplotlib: pip install 'accelengine[plot]'"

# series[run][key] = [(step, value), ...]
Series = dict[str, dict[str, list[tuple[int, float]]]]


def find_runs(path: Path) -> list[Path]:
    """The run directories at or below `path` (those holding a `metrics.jsonl`), sorted."""
    if not path.is_dir():
        raise EngineError(f"`{path}` is not a directory: give a run directory or a folder of runs")
    if (path / METRICS_FILE).is_file():
        return [path]
    runs = sorted(p.parent for p in path.rglob(METRICS_FILE) if PLOT_DIR not in p.relative_to(path).parts)
    if not runs:
        raise EngineError(f"no {METRICS_FILE} found in or below `{path}`: is it a run directory?")
    return runs


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):  # how MetricsWriter stores non-finite values
        return float(v)
    return None


def load_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """`{key: [(step, value), ...]}` from a `metrics.jsonl`, sorted by step; when a step was logged twice (a resumed
    run), the later record wins. Unreadable lines (a run killed mid-write) are skipped."""
    by_key: dict[str, dict[int, float]] = defaultdict(dict)
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, value in record.items():
            number = _number(value)
            if "/" in key and number is not None:
                by_key[key][record["step"]] = number
    return {k: sorted(v.items()) for k, v in by_key.items()}


# `lr/<param group>` and the like: the quantity is the prefix. Keys under these prefixes are training-side.
PER_GROUP = ("lr", "momentum", "grad_norm")
TRAIN_SIDE = ("train", "perf", *PER_GROUP)


def quantity(key: str) -> str:
    """What a key measures, whatever the split: `train/loss` and `val/loss` are `loss`; `train/lr`, `lr/0` are `lr`."""
    head, _, tail = key.partition("/")
    return head if head in PER_GROUP or not tail else tail


def group(series: Series) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """`{quantity: {"train"|"eval": [(run, key), ...]}}`: what each figure and panel draws."""
    figures: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
    for run, keys in series.items():
        for key in keys:
            panel = "train" if key.split("/", 1)[0] in TRAIN_SIDE else "eval"
            figures[quantity(key)][panel].append((run, key))
    order = sorted(figures, key=lambda q: (q != "loss", q != "lr", q))
    return {q: dict(figures[q]) for q in order}


def _filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def plot(series: Series, out_dir: Path) -> list[Path]:
    """One PNG per quantity in `out_dir`; returns the files written."""
    try:
        import matplotlib  # noqa: F401  (first: a missing package is reported even if a submodule is cached)
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError as err:
        raise EngineError(INSTALL_HINT) from err
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # `--out loss.png`, a file from an earlier report: a mistake on the command line
        raise EngineError(f"cannot write the plots to `{out_dir}`: {err}; give --out a directory") from err
    several = len(series) > 1
    written = []
    for name, panels in group(series).items():
        fig = Figure(figsize=(6 * len(panels), 4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
            for run, key in lines:
                points = series[run][key]
                steps = [s for s, _ in points]
                values = [v if math.isfinite(v) else float("nan") for _, v in points]
                label = f"{run}: {key}" if several else key
                style = {"marker": "o", "markersize": 3} if panel == "eval" or len(points) < 3 else {}
                ax.plot(steps, values, label=label, **style)
            ax.set_title(f"{name} ({'training' if panel == 'train' else 'evaluation'})")
            ax.set_xlabel("step")
            ax.set_ylabel(name)
            if name == "lr" and all(v > 0 for run, key in lines for _, v in series[run][key]):
                ax.set_yscale("log")  # warm-up and decay span decades
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        path = out_dir / f"{_filename(name)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


def run_summary(run_dir: Path, series: dict[str, list[tuple[int, float]]]) -> str:
    """One line per run: status, steps, last training loss, best and final evaluation values."""
    stale = summary_is_stale(run_dir)  # an earlier attempt's: the latest one is still going, or was killed
    found = None if stale else read_json(run_dir / "summary.json")  # a run still going (or killed) has none
    summary: dict[str, Any] = found if isinstance(found, dict) else {}
    steps = max((p[-1][0] for p in series.values() if p), default=0)
    no_summary = "no summary.json of its latest attempt" if stale else "no summary.json"
    parts = [f"{summary.get('status', no_summary)}", f"{summary.get('steps', steps)} steps"]
    loss = series.get("train/loss")
    if loss:
        parts.append(f"train/loss {loss[-1][1]:.4g}")
    best = summary.get("best")
    if best:
        parts.append(f"best {best['metric']} {best['value']:.4g} @ step {best['step']}")
    final = summary.get("final") or {k: v[-1][1] for k, v in series.items() if k.split("/")[0] not in TRAIN_SIDE}
    parts += [f"{k} {v:.4g}" for k, v in list(final.items())[:4]]
    return ", ".join(parts)


def report(path: str | Path, out: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """Plot the run(s) at `path` into `out` (default `PATH/plots`); returns (PNG files, summary lines)."""
    root = Path(path)
    runs = find_runs(root)
    series: Series = {}
    lines = []
    for run_dir in runs:
        label = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
        series[label] = load_metrics(run_dir / METRICS_FILE)
        lines.append(f"{label}: {run_summary(run_dir, series[label])}")
    if not any(series.values()):
        raise EngineError(f"the {METRICS_FILE} file(s) under `{root}` hold no records yet")
    files = plot(series, Path(out) if out is not None else root / PLOT_DIR)
    return files, lines
