"""The run directory: resolved recipe, environment record, console log, summary. Main process only."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("accelengine")


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    """`runs/<name>/<timestamp>`; a suffix keeps two runs started in the same second apart."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / name / stamp
    path, n = base, 1
    while path.exists():
        path = base.with_name(f"{stamp}-{n}")
        n += 1
    return path


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): a killed process never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """A JSON file, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summary_is_stale(run_dir: Path) -> bool:
    """Whether a run directory's `summary.json` is from an earlier attempt: a later one started (every run rewrites
    `env.json` as it starts) and ended without writing its own (killed, out of memory, node lost).

    Each attempt writes a random `attempt` id into `env.json` and `summary.json`: when `env.json` has one, they
    decide. Run directories of earlier versions have none; then both the files' times and the start time recorded
    inside `env.json` must say so: file times alone mislead after a copy that does not keep them (`cp -r`), the
    recorded start (a local time, in whole seconds) alone when read in another time zone."""
    env = read_json(run_dir / "env.json")
    if isinstance(env, dict) and "attempt" in env:
        summary = read_json(run_dir / "summary.json")
        return isinstance(summary, dict) and summary.get("attempt") != env["attempt"]
    try:
        summary_time = (run_dir / "summary.json").stat().st_mtime
        env_time = (run_dir / "env.json").stat().st_mtime
    except OSError:
        return False
    try:
        started = _dt.datetime.fromisoformat(env["started"]).timestamp()
    except (TypeError, KeyError, ValueError):
        return False
    return env_time > summary_time and started > summary_time


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment(accelerator: Any = None, seed: int | None = None) -> dict[str, Any]:
    """Versions, git state of the working directory, command line, hardware, world size, effective settings."""
    import accelerate
    import torch

    import accelengine

    commit = _git("rev-parse", "HEAD")
    env: dict[str, Any] = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "accelengine": accelengine.__version__,
        },
        "git": {"commit": commit, "dirty": bool(_git("status", "--porcelain")) if commit else None},
        "command": sys.argv,
        "cwd": os.getcwd(),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "seed": seed,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if accelerator is not None:
        env.update(
            {
                "world_size": accelerator.num_processes,
                "device": str(accelerator.device),
                "distributed_type": str(accelerator.distributed_type),
                "mixed_precision": accelerator.mixed_precision,
                "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
                # what `accelerate launch` passed on: flags and config file end up in these variables
                "launcher_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ACCELERATE_")},
            }
        )
    return env


class _MainOnly(logging.Filter):
    def __init__(self, is_main: bool) -> None:
        super().__init__()
        self.is_main = is_main

    def filter(self, record: logging.LogRecord) -> bool:
        return self.is_main or record.levelno >= logging.WARNING


def setup_logging(out_dir: Path | None, is_main: bool, rank: int = 0) -> list[logging.Handler]:
    """Console lines from the main process (warnings from every rank, prefixed), and a copy in `log.txt` (the run
    directory is made if it is not there). `Engine.fit` calls it first, and `close_run_log` last."""
    log = logging.getLogger("accelengine")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        if getattr(h, "_accelengine", False):
            log.removeHandler(h)
            h.close()
    prefix = "" if is_main else f"[rank {rank}] "
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    console.addFilter(_MainOnly(is_main))
    # how `info_line` writes an INFO line to each handler, the same as its formatter (None: the filter drops it)
    console._accelengine_info = (lambda text, now: text) if is_main else None  # type: ignore[attr-defined]
    handlers: list[logging.Handler] = [console]
    if out_dir is not None and is_main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(out_dir / "log.txt", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        file._accelengine_info = lambda text, now: f"{_asctime(now)} INFO {text}"  # type: ignore[attr-defined]
        handlers.append(file)
    for h in handlers:
        h._accelengine = True  # type: ignore[attr-defined]
        log.addHandler(h)
    return handlers


def close_run_log() -> None:
    """Detach and close the run's `log.txt` (at the very end of `fit`): later lines of the process, another run's
    included, do not belong to it. The console handler stays."""
    log = logging.getLogger("accelengine")
    for h in list(log.handlers):
        if getattr(h, "_accelengine", False) and isinstance(h, logging.FileHandler):
            log.removeHandler(h)
            h.close()


def _asctime(now: float) -> str:
    """`%(asctime)s` as `logging.Formatter` writes it by default: `2025-01-31 12:00:00,123`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int((now - int(now)) * 1000):03d}"


def info_line(text: str) -> None:
    """`logging.getLogger("accelengine").info(text)` for lines written at every log step (the console logger's),
    straight to the handlers `setup_logging` installed, with the same output.

    Through `logging` (a LogRecord, filters, formatters, locks) a line costs several times the write itself: about
    70 us per line in a training loop, 2-3 % of a small model's CPU step at `log_every = 10`. Whenever another handler
    is attached (a user's) or INFO is disabled, the line goes through `logging` as usual.
    """
    log = logging.getLogger("accelengine")
    handlers = log.handlers
    if not handlers or not log.isEnabledFor(logging.INFO) or any(not hasattr(h, "_accelengine_info") for h in handlers):
        log.info(text)
        return
    now = time.time()
    for handler in handlers:
        render = handler._accelengine_info  # type: ignore[attr-defined]
        if render is None or handler.level > logging.INFO:
            continue
        handler.acquire()
        try:
            handler.stream.write(render(text, now) + handler.terminator)  # type: ignore[attr-defined]
            handler.flush()
        finally:
            handler.release()


def _in_run_dir(path: Path, cache: dict[Path, bool]) -> bool:
    """True inside an earlier run directory (it holds an `env.json`): its `code/` copy is not the user's source."""
    for parent in path.parents:
        if parent not in cache:
            cache[parent] = (parent / "env.json").is_file()
        if cache[parent]:
            return True
    return False


def snapshot_code(patterns: list[str], root: Path, dest: Path, max_bytes: int = 2**20) -> list[str]:
    """Copy the files matching `patterns` (globs relative to `root`, `**` for any depth; absolute globs too) into
    `dest`, keeping their paths relative to `root`. Skips hidden and `__pycache__` folders, run directories and
    files over `max_bytes` (a warning names them). Returns the copied paths, relative to `dest`."""
    import glob
    import shutil

    root = root.resolve()
    copied: list[str] = []
    cache: dict[Path, bool] = {}
    for pattern in patterns:
        matches = glob.glob(pattern if Path(pattern).is_absolute() else str(root / pattern), recursive=True)
        for found in sorted(Path(m).resolve() for m in matches):
            if not found.is_file():
                continue
            rel = found.relative_to(root) if found.is_relative_to(root) else Path(found.name)
            if any(p.startswith(".") or p == "__pycache__" for p in rel.parts[:-1]) or _in_run_dir(found, cache):
                continue
            if found.stat().st_size > max_bytes:
                logger.warning(f"copy_code: skipped {rel} ({found.stat().st_size} bytes; the limit is {max_bytes})")
                continue
            if str(rel) in copied:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(found, target)
            copied.append(str(rel))
    if not copied:
        logger.warning(f"copy_code: no file matched {patterns} under {root}")
    return copied
