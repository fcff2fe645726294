"""The run directory: resolved recipe, environment record, console log, summary. Main process only."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
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
    """Console lines from the main process (warnings from every rank, prefixed), and a copy in `log.txt`."""
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
    handlers: list[logging.Handler] = [console]
    if out_dir is not None and is_main:
        file = logging.FileHandler(out_dir / "log.txt", encoding="utf-8")
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file)
    for h in handlers:
        h._accelengine = True  # type: ignore[attr-defined]
        log.addHandler(h)
    return handlers
