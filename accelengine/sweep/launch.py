"""Running experiments: each one is `accelengine run <exp>/recipe.toml --out <exp>` in its own process, so a crash,
a hang or a leaked CUDA context stays inside one experiment, and re-running the same command resumes it.

Locally, `parallel` processes run at once, each pinned to its own GPU(s) or its own CPU cores. The SLURM launcher
(`accelengine.sweep.slurm`) submits the same commands as a job array.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import accelengine
from accelengine.preemption import NO_REQUEUE

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOPPED = "stopped with the session"  # the error text of experiments stopped by Ctrl-C or SIGTERM
STOP_GRACE_S = 30.0  # how long a stopped experiment may take to write its checkpoint before it is killed


@dataclass
class Task:
    """One experiment to run: the command, the variables it needs on top of the environment, where it logs."""

    index: int
    name: str
    dir: Path
    command: list[str]
    env: dict[str, str]

    @property
    def log(self) -> Path:
        return self.dir / "console.log"


OnStart = Callable[[Task, str], None]  # task, a note such as its SLURM job id
OnFinish = Callable[[Task, int | None, str], None]  # task, exit code (None: unknown), error text from the launcher


def experiment_command(recipe: Path, out: Path, launch: list[str] | None = None) -> list[str]:
    """The command that runs (or resumes) one experiment; with `launch` flags it goes through `accelerate launch`."""
    run = ["-m", "accelengine", "run", str(recipe), "--out", str(out)]
    if not launch:
        return [sys.executable, *run]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, *run]


def experiment_env(recipe_dir: Path) -> dict[str, str]:
    """What each experiment needs on top of the environment: the same accelengine as this process (a source
    checkout that is not installed works too), user components beside the session recipe, unbuffered output so the
    console log keeps print and traceback in order."""
    paths = [str(recipe_dir.resolve())]
    root = Path(accelengine.__file__).resolve().parent.parent
    if root.name not in ("site-packages", "dist-packages"):  # an installed package is found without help
        paths.insert(0, str(root))
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    # the session (or submitit) owns the SLURM job: an experiment must not requeue the allocation it runs in
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1", NO_REQUEUE: "1"}


def with_free_port(command: list[str]) -> list[str]:
    """Experiments that share a machine would all take `accelerate launch`'s default port 29500: give each launch
    a free one, unless the session's flags chose a port."""
    if command[1:3] != ["-m", "accelerate.commands.launch"] or "--main_process_port" in command:
        return command
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [*command[:3], "--main_process_port", str(port), *command[3:]]


def log_header(command: list[str], file: Any) -> None:
    stamp = _dt.datetime.now().isoformat(timespec="seconds")
    file.write(f"### {stamp} {shlex.join(command)}\n")
    file.flush()


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the process has ended (reaping it). Not through Popen's own wait: this also runs in submitit's signal
    handler, which may have interrupted a `proc.wait()` that holds Popen's lock until the handler returns."""
    if proc.returncode is not None:
        return True
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:  # reaped already
        return True
    if pid == 0:
        return False
    proc.returncode = os.waitstatus_to_exitcode(status)
    return True


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop_processes(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each experiment's whole process group (accelerate launch's workers included): the engine checkpoints
    and exits, so a re-run resumes. Whatever still runs after `grace_s` is killed."""
    for proc in procs:
        if proc.returncode is None:
            _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while not all(_exited(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in procs:
        if not _exited(proc):
            _signal_group(proc, signal.SIGKILL)
            while not _exited(proc):
                time.sleep(0.05)


# --- local --------------------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """The share of the machine one concurrent experiment gets."""

    env: dict[str, str]
    cpus: list[int] | None = None


def _visible_gpus() -> list[str]:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA install must not stop CPU experiments
        return []


def plan_slots(parallel: int) -> list[Slot]:
    """Split the machine between `parallel` experiments: GPUs evenly (round-robin when there are fewer GPUs than
    experiments), CPU cores evenly (thread pools sized to match, so N experiments do not fight over every core)."""
    if parallel <= 1:
        return [Slot({})]  # one at a time: the experiment gets the whole machine, as with `accelengine run`
    gpus = _visible_gpus()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    per_core = max(1, len(cores) // parallel)
    per_gpu = max(1, len(gpus) // parallel) if gpus else 0
    slots = []
    for i in range(parallel):
        env = {"OMP_NUM_THREADS": str(per_core), "MKL_NUM_THREADS": str(per_core)}
        if gpus:
            mine = gpus[i * per_gpu : (i + 1) * per_gpu] if len(gpus) >= parallel else [gpus[i % len(gpus)]]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
        mine_cores = cores[i * per_core : (i + 1) * per_core] if len(cores) >= parallel else [cores[i % len(cores)]]
        slots.append(Slot(env, mine_cores if hasattr(os, "sched_setaffinity") else None))
    return slots


def _child_setup(cpus: list[int] | None) -> Callable[[], None]:
    """What the child does between fork and exec: take its share of cores, and ask Linux to SIGTERM it if the
    session dies without stopping it (killed, out of memory), so no experiment goes on training unwatched. The libc
    function is looked up here, in the parent: the child only calls it."""
    prctl = None
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None).prctl

    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGHUP stop the session like Ctrl-C does (the experiments checkpoint), not abruptly."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start(task: Task, slot: Slot) -> tuple[subprocess.Popen, IO[str]]:
    task.dir.mkdir(parents=True, exist_ok=True)
    log = open(task.log, "a", encoding="utf-8")  # noqa: SIM115 - closed when the process ends
    command = with_free_port(task.command)
    log_header(command, log)
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **task.env, **slot.env},
        preexec_fn=_child_setup(slot.cpus),
        start_new_session=True,  # Ctrl-C reaches the session only, which stops the experiments gracefully
    )
    return proc, log


def run_local(tasks: list[Task], parallel: int, on_start: OnStart, on_finish: OnFinish) -> None:
    """Run every task, `parallel` at a time; returns when all have finished. On Ctrl-C, SIGTERM or any error the
    running experiments are stopped the way a preemption stops them, so the same command resumes them later."""
    slots = plan_slots(min(parallel, len(tasks)) if tasks else 1)
    free = list(range(len(slots)))
    pending = list(tasks)
    running: dict[int, tuple[Task, subprocess.Popen, IO[str]]] = {}
    with stop_on_signals():
        try:
            while pending or running:
                while pending and free:
                    task, slot = pending.pop(0), free.pop(0)
                    on_start(task, "")
                    running[slot] = (task, *_start(task, slots[slot]))
                for slot, (task, proc, log) in list(running.items()):
                    if proc.poll() is not None:
                        log.close()
                        del running[slot]
                        free.append(slot)
                        on_finish(task, proc.returncode, "")
                time.sleep(0.1)
        except BaseException:
            stop_processes([proc for _, proc, _ in running.values()])
            for task, proc, log in running.values():
                log.close()
                on_finish(task, proc.returncode, STOPPED)
            raise


__all__ = ["Slot", "Task", "experiment_command", "experiment_env", "plan_slots", "run_local", "stop_processes"]
