"""Run every benchmark figure and write `benchmarks/RESULTS.md` (machine, versions, date, each figure with its ratio,
target and how it was measured).

    python benchmarks/run_all.py                 # about 6-7 minutes on 2 cores; writes benchmarks/RESULTS.md
    python benchmarks/run_all.py --quick         # tiny configurations: checks the pipeline in about a minute
    python benchmarks/run_all.py --out /tmp/R.md

Each script runs in a fresh process (`python benchmarks/<script>.py --json ...`) and its JSON is collected, so a
figure never inherits another's threads, allocator state or imports. The figures are medians over alternated
rounds; on a shared machine they still move by a few percent between runs (the 1-minute load average is recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Job:
    """One script run: its arguments (full and quick) and how long it may take."""

    script: str
    args: list[str]
    quick_args: list[str]
    timeout_s: int = 600
    needs_cuda: bool = False  # measured only where a CUDA device is present (its quick arguments run anywhere)


JOBS: dict[str, Job] = {
    # Rounds pooled from several fresh processes: within one, heap layout and memory placement favour one contestant
    # by up to about 1 % throughout (the scripts' controls show it); fresh processes draw them anew.
    "overhead_tiny": Job(
        "overhead.py", ["--steps", "300", "--rounds", "24", "--processes", "3"], ["--steps", "30", "--rounds", "2"]
    ),
    "overhead_2048": Job(
        "overhead.py",
        # many short rounds: one round's ratio scatters by about 5 % here, so a 1 % target needs about 100 of them
        ["--hidden", "2048", "--steps", "150", "--rounds", "100", "--processes", "5", "--no-plain-loader"],
        ["--hidden", "2048", "--steps", "5", "--rounds", "1", "--warmup", "2"],
    ),
    # the data figure moves by up to about 3 % with where its tables lie; each process draws its own layout
    "data": Job("data_throughput.py", ["--rounds", "64", "--processes", "8"], ["--samples", "2000", "--rounds", "1"]),
    "startup": Job("startup.py", ["--rounds", "7", "--cli-rounds", "3"], ["--rounds", "1", "--cli-rounds", "1"]),
    "checkpoint": Job("checkpoint_figures.py", ["--runs", "21"], ["--params", "200000", "--runs", "1"]),
    "resume_skip": Job("resume_skip.py", ["--rounds", "7"], ["--batches", "1000", "--rounds", "1"]),
    "gpu_lm": Job(
        "gpu_lm.py",
        ["--steps", "100", "--rounds", "3"],
        ["--tiny", "--steps", "5", "--warmup", "2", "--rounds", "1"],
        needs_cuda=True,
    ),
    # it prints its JSON (indented) without being asked: no --json flag
    "callbacks": Job("callback_overhead.py", ["--steps", "2000", "--runs", "5"], ["--steps", "50", "--runs", "1"]),
}
NO_JSON_FLAG = {"callback_overhead.py"}


def run_job(job: Job, quick: bool) -> dict[str, Any]:
    """Run one script in a fresh process; its stdout must end with the JSON result (one line or indented)."""
    args = [sys.executable, str(HERE / job.script), *(job.quick_args if quick else job.args)]
    if job.script not in NO_JSON_FLAG:
        args.append("--json")
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=job.timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout.strip()
    try:
        result = json.loads(out)
    except ValueError:  # other output before it: the JSON is the last line
        result = json.loads(out.splitlines()[-1])
    result["_seconds"] = round(time.perf_counter() - start, 1)
    return result


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import accelerate
    import safetensors
    import torch

    import accelengine

    try:
        import datasets

        datasets_version = datasets.__version__
    except ImportError:
        datasets_version = "not installed"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT)
        commit = sha.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    except OSError:
        commit = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "accelengine": accelengine.__version__,
        "safetensors": safetensors.__version__,
        "datasets": datasets_version,
        "commit": commit,
    }


@dataclass
class Row:
    figure: str
    result: str
    ratio: str
    target: str
    met: str
    how: str


def _met(ok: bool | None) -> str:
    return "reported" if ok is None else ("yes" if ok else "**no**")


def rows(r: dict[str, dict[str, Any]]) -> list[Row]:
    """The table: one row per figure, from the scripts' JSON."""
    out: list[Row] = []

    def add(key: str, make: Callable[[dict[str, Any]], list[Row]]) -> None:
        if key in r:
            out.extend(make(r[key]))

    def overhead(label: str, target: float) -> Callable[[dict[str, Any]], list[Row]]:
        def ratio(o: dict[str, Any], name: str) -> str:
            low, high = o[name + "_paired_ci95"]
            return (
                f"{o[name + '_paired']}x (95% interval {low}-{high}; of medians {o[name]}x, of minimums "
                f"{o[name + '_of_minimums']}x)"
            )

        def make(o: dict[str, Any]) -> list[Row]:
            how = (
                f"`overhead.py`: MLP 64-{o['hidden']}-10, batch {o['batch']}, SGD, 1 thread; raw loop, hand-written "
                f"Accelerate loop and engine (logging every {o['log_every']} steps) alternated, {o['rounds']} rounds "
                f"(from {o.get('processes', 1)} fresh processes) x {o['steps']} steps after {o['warmup']} warm-up, "
                "each run from a trimmed heap; no per-step timer (the "
                "engine is timed between two log steps); per-step times are medians over rounds. Ratio: the median of "
                "each round's own ratio (paired: drift cancels), on which the target is judged; the interval is a "
                "bootstrap 95% interval of that median"
            )
            return [
                Row(
                    f"Engine step vs bare PyTorch loop, {label}, default callbacks",
                    f"{o['engine_us']} us vs {o['raw_us']} us",
                    ratio(o, "engine_vs_raw"),
                    f"<= {target}x",
                    _met(o["engine_vs_raw_paired"] <= target),
                    how,
                ),
                Row(
                    f"Engine step vs bare PyTorch loop, {label}, no callbacks",
                    f"{o['engine_bare_us']} us vs {o['raw_us']} us",
                    ratio(o, "engine_bare_vs_raw"),
                    "-",
                    _met(None),
                    "as above, the engine with its callback list emptied",
                ),
                Row(
                    f"Engine step vs bare loop making the engine's optimizer calls, {label}, default callbacks",
                    f"{o['engine_us']} us vs {o['raw_lean_us']} us",
                    ratio(o, "engine_vs_raw_lean"),
                    "-",
                    _met(None),
                    "as above; the bare loop calls the optimizer as the engine does (`lean_optimizer_calls`: no "
                    "per-call profiler annotation or hook loop), so this is the engine's own loop cost; no callbacks: "
                    f"{o['engine_bare_vs_raw_lean_paired']}x",
                ),
                Row(
                    f"Engine step vs hand-written Accelerate loop, {label}",
                    f"{o['engine_us']} us vs {o['accelerate_us']} us",
                    ratio(o, "engine_vs_accelerate"),
                    "<= 1.0x",
                    _met(o["engine_vs_accelerate_paired"] <= 1.0),
                    "as above; the Accelerate loop uses `accelerator.backward` and the prepared optimizer",
                ),
                Row(
                    f"Control: bare loop vs itself, {label}",
                    f"{o['raw_again_us']} us vs {o['raw_us']} us",
                    ratio(o, "raw_again_vs_raw"),
                    "-",
                    _met(None),
                    "as above, the bare loop timed twice per round as two contestants: its distance from 1.0 is what "
                    "this run cannot resolve",
                ),
            ]

        return make

    add("overhead_tiny", overhead("tiny MLP (hidden 32)", 1.05))
    add("overhead_2048", overhead("compute-bound (hidden 2048)", 1.01))
    add(
        "startup",
        lambda s: [
            Row(
                "`import accelengine` on top of `import torch, accelerate`",
                f"+{s['import_accelengine_s']} s (torch+accelerate: {s['import_torch_accelerate_s']} s)",
                "-",
                "<= 0.3 s",
                _met(s["import_accelengine_s"] <= 0.3),
                f"`startup.py`: timed in fresh processes after `import torch, accelerate`, median of {s['rounds']}; "
                f"from outside (difference of whole-process times): +{s['import_accelengine_extra_s']} s",
            ),
            Row(
                "CLI start-up to the first step of `recipes/digits.toml`",
                f"{s['cli_to_first_step_s']} s (same work without accelengine: {s['bare_to_first_step_s']} s)",
                f"{round(s['cli_to_first_step_s'] / s['bare_to_first_step_s'], 3)}x"
                if s["bare_to_first_step_s"]
                else "-",
                "reported",
                _met(None),
                f"`startup.py`: `python -m accelengine run` until a callback sees step 1 (median of "
                f"{s['cli_rounds']}); the bare script imports torch, scikit-learn and `datasets` and takes one AdamW "
                "step",
            ),
        ],
    )

    def checkpoint(c: dict[str, Any]) -> list[Row]:
        m = c["median_s"]
        base = m[c["load_baseline"]]
        how_save = (
            f"`checkpoint_figures.py`: {c['state_mb']} MB ({c['params']:,}-parameter model + AdamW state), "
            f"{c['runs']} alternated runs; times are medians, the ratio is the median of each run's own ratio "
            "(paired). Baseline: `save_file` x2 into a new directory + fsync of each file; ours also writes json, xxh3 "
            "checksums, manifest, fsyncs directories, renames, rotates (deletion waited for untimed)"
        )
        how_load = (
            "warm page cache; ours: every file read once into owned memory, checksum checked as it is read; "
            f"baseline `{c['load_baseline']}` (data read into owned memory, as ours)"
        )
        return [
            Row(
                "Checkpoint save vs `safetensors.save_file` + fsync",
                f"{m['save']} s vs {m['save_plain']} s ({c['save_mb_per_s']} MB/s)",
                f"{c['save_ratio_paired']}x (of medians {c['save_ratio']}x, of minimums "
                f"{c['save_ratio_of_minimums']}x)",
                "<= 1.2x",
                _met(c["save_ratio_paired"] <= 1.2),
                how_save,
            ),
            Row(
                'Checkpoint load (`read_checkpoint`, verified) vs `load_file(backend="pread")`',
                f"{m['load']} s vs {base} s ({c['load_mb_per_s']} MB/s)",
                f"{c['load_ratio_paired']}x (of medians {c['load_ratio']}x, of minimums "
                f"{c['load_ratio_of_minimums']}x)",
                "<= 1.2x",
                _met(c["load_ratio_paired"] <= 1.2),
                how_load,
            ),
            Row(
                "Checkpoint load vs `load_file` (mmap) + every byte read once",
                f"{m['load']} s vs {m['load_plain_touched']} s",
                f"{c['load_ratio_vs_touched']}x",
                "<= 1.2x",
                _met(c["load_ratio_vs_touched"] <= 1.2),
                "the mapped baseline reads the page cache in place: no allocation, no copy (ours copies into "
                "owned memory so that a rotated-away checkpoint frees its disk space)",
            ),
            Row(
                "Checkpoint load vs lazy `load_file` (mmap, no data read)",
                f"{m['load']} s vs {m['load_plain_mmap']} s",
                f"{c['load_ratio_vs_lazy_mmap']}x",
                "not a fair baseline",
                _met(None),
                "lazy mapping reads nothing until a tensor is used; listed for completeness",
            ),
            Row(
                "Resume read: `find_latest` (verifies) + `read_checkpoint`",
                f"{m['resume']} s (verify alone {m['verify']} s, {c['verify_mb_per_s']} MB/s)",
                f"{c['resume_ratio']}x of the pread baseline",
                "reported",
                _met(None),
                "what `plan_resume` + `restore` read: the newest checkpoint is checked, then read once",
            ),
        ]

    add("checkpoint", checkpoint)
    add(
        "resume_skip",
        lambda s: [
            Row(
                f"Resume at batch {s['batches']:,} vs batch 0 (map-style data set)",
                f"{s['resume_at_n_s']} s vs {s['resume_at_0_s']} s ({s['resume_n_minus_0_s']:+} s; loading those "
                f"batches instead: {s['load_n_batches_s']} s)",
                f"{s['resume_n_vs_0']}x",
                "about the same (skip by index)",
                _met(s["resume_n_minus_0_s"] < 0.1 * s["load_n_batches_s"]),
                f"`resume_skip.py`: `TensorDataset` of {s['samples']:,} samples, batch {s['batch_size']}; time from "
                f"`fit()` of a resumed engine to the end of its first step, median of {s['rounds']} alternated",
            )
        ],
    )

    def data(d: dict[str, Any]) -> list[Row]:
        low, high = d["hf_vs_tensor_dataset_paired_ci95"]
        c_low, c_high = d["tensor_dataset_again_vs_tensor_dataset_paired_ci95"]
        return [
            Row(
                'HF `datasets` table (`set_format("torch")`) vs `TensorDataset` through the loader',
                f"{d['hf_table_samples_per_s']:,} vs {d['tensor_dataset_samples_per_s']:,} samples/s",
                f"{d['hf_vs_tensor_dataset_paired']}x (95% interval {low}-{high}; "
                f"of medians {d['hf_vs_tensor_dataset']}x)",
                ">= 1.0x",
                _met(d["hf_vs_tensor_dataset_paired"] >= 1.0),
                f"`data_throughput.py`: {d['samples']:,} samples x {d['features']} features, batch {d['batch']}, "
                f"shuffled, 3 epochs per measurement, {d['rounds']} alternated rounds (from "
                f"{d.get('processes', 1)} fresh processes, each building the data sets in its own order with random "
                "gaps between them, so that the pooled ratio samples memory placements), paired ratio, two-stage "
                "bootstrap interval (processes, then rounds); plain "
                f"`DataLoader` over the `TensorDataset`: {d['tensor_dataset_plain_loader_samples_per_s']:,} samples/s",
            ),
            Row(
                "Control: `TensorDataset` vs a second one built the same way",
                f"{d['tensor_dataset_again_samples_per_s']:,} vs {d['tensor_dataset_samples_per_s']:,} samples/s",
                f"{d['tensor_dataset_again_vs_tensor_dataset_paired']}x (95% interval {c_low}-{c_high})",
                "-",
                _met(None),
                "as above: its distance from 1.0 is what this run cannot resolve",
            ),
        ]

    add("data", data)

    def gpu_lm(g: dict[str, Any]) -> list[Row]:
        figure = "~100M-parameter transformer LM in bf16: engine vs hand-written loop, tokens/s"
        if "not_measured" in g:
            return [Row(figure, f"not measured: {g['not_measured']}", "-", "within 2%", _met(None), "`gpu_lm.py`")]
        return [
            Row(
                figure + ("" if not g["tiny"] else " (tiny model, not the figure)"),
                f"{g['engine_tokens_per_s']:,} vs {g['hand_written_tokens_per_s']:,} tokens/s on {g['device']}",
                f"{g['engine_vs_hand_written_paired']}x (of medians {g['engine_vs_hand_written']}x)",
                ">= 0.98x",
                _met(g["engine_vs_hand_written_paired"] >= 0.98 if not g["tiny"] else None),
                f"`gpu_lm.py`: {g['params']:,} parameters, {g['tokens_per_step']:,} tokens per step, AdamW, bf16 "
                f"autocast, {g['rounds']} alternated rounds x {g['steps']} steps",
            ),
            Row(
                "No host-device synchronisation between log steps (GPU)",
                f'{g["sync_free_steps"]} steps ran under `torch.cuda.set_sync_debug_mode("error")`',
                "-",
                "none",
                _met(g["sync_free_steps"] > 0 if g["device"] != "cpu" else None),
                "`gpu_lm.py`: any synchronising call between two log steps raises, failing the run",
            ),
        ]

    add("gpu_lm", gpu_lm)
    add(
        "callbacks",
        lambda c: [
            Row(
                "Default callbacks vs none, per step",
                f"{c['us_per_step']['defaults']} us vs {c['us_per_step']['none']} us "
                f"({c['in_callbacks_us_per_step']} us inside handlers)",
                f"{c['overhead_pct']:+}% (paired {c['paired_overhead_pct']:+}%)",
                "part of the engine's 1.05x",
                _met(None),
                f"`callback_overhead.py`: MLP 32-64-4, batch 32, log every {c['log_every']} steps, {c['steps']} "
                f"steps x {c['runs']} alternated runs",
            )
        ],
    )
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def markdown(results: dict[str, dict[str, Any]], info: dict[str, str], quick: bool, seconds: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmark results",
        "",
        "Regenerate with `python benchmarks/run_all.py` (writes this file; about 6-7 minutes on 2 cores). Each figure",
        "comes from one script in `benchmarks/`, run in a fresh process; the scripts' docstrings say exactly what they",
        "measure. Timing ratios on a shared machine move by a few percent from run to run. The same comparisons",
        "under pytest-benchmark: `python -m pytest benchmarks --benchmark-only` (see `benchmarks/conftest.py`).",
        "",
        f"- **Date**: {date}" + (" (**--quick**: tiny configurations, not meaningful figures)" if quick else ""),
        f"- **Machine**: {info['cpu']}, {info['cores']} cores, {info['os']}; 1-minute load average "
        f"{results.get('_load', '?')}",
        f"- **Versions**: python {info['python']}, torch {info['torch']}, accelerate {info['accelerate']}, "
        f"accelengine {info['accelengine']} ({info['commit']}), safetensors {info['safetensors']}, "
        f"datasets {info['datasets']}",
        f"- **Run time**: {seconds:.0f} s",
        "",
        "| Figure | Result | Ratio | Target | Met | How measured |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r.figure} | {r.result} | {r.ratio} | {r.target} | {r.met} | {r.how} |" for r in rows(results)]
    failed = results.get("_failed", {})
    if failed:
        lines += ["", "**Figures that failed to run**:", ""]
        lines += [f"- `{name}`: {err.strip().splitlines()[-1] if err.strip() else err}" for name, err in failed.items()]
    raw = {k: v for k, v in results.items() if not k.startswith("_")}
    lines += [
        "",
        "<details><summary>Raw results (JSON from each script)</summary>",
        "",
        "```json",
        json.dumps(raw, indent=1),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="tiny configurations: checks the pipeline, not the speed")
    ap.add_argument("--only", nargs="*", choices=list(JOBS), help="run only these figures")
    args = ap.parse_args()
    start = time.perf_counter()
    results: dict[str, Any] = {"_load": [round(os.getloadavg()[0], 2)]}
    failed: dict[str, str] = {}
    for name, job in JOBS.items():
        if args.only and name not in args.only:
            continue
        if job.needs_cuda and not args.quick and not _cuda():
            results[name] = {"not_measured": "no CUDA device on this machine"}
            continue
        print(f"running {name}: {job.script} ...", file=sys.stderr, flush=True)
        try:
            results[name] = run_job(job, args.quick)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:  # report it; go on with the others
            failed[name] = str(err)
            print(f"  failed: {err}", file=sys.stderr)
    results["_load"].append(round(os.getloadavg()[0], 2))
    results["_load"] = f"{results['_load'][0]} at the start, {results['_load'][1]} at the end"
    results["_failed"] = failed
    args.out.write_text(markdown(results, machine(), args.quick, time.perf_counter() - start))
    print(f"wrote {args.out}", file=sys.stderr)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
