"""The SLURM launcher: one job-array task per experiment, through submitit (imported only here, only when used).

Each task runs the experiment's command as a child process. On preemption or timeout SLURM signals the task,
submitit calls `checkpoint()`, which stops the experiment the way the engine expects (SIGTERM: checkpoint and exit)
and resubmits the same command; the requeued task resumes the run from its checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit

from accelengine.errors import EngineError, Problem, RecipeError
from accelengine.sweep.launch import (
    OnFinish,
    OnStart,
    Task,
    log_header,
    stop_on_signals,
    stop_processes,
    with_free_port,
)

DEFAULT_TIMEOUT_MIN = 60  # submitit's own default is 5 minutes (2 for its local executor): far too short to train
_POLL_S = 2.0


def executor_parameters(table: dict[str, Any], parallel: int | None, name: str) -> tuple[str, dict[str, Any]]:
    """`[sweep.slurm]` -> (cluster, keyword arguments for `AutoExecutor.update_parameters`). Keys are submitit's
    generic names (`timeout_min`, `gpus_per_node`, `cpus_per_task`, `mem_gb`, `nodes`) or SLURM ones with or without
    the `slurm_` prefix (`partition`, `account`, `qos`, `constraint`, `gpus_per_task`, `additional_parameters`...).
    Unknown keys are a RecipeError naming the key; no SLURM on this machine is an EngineError."""
    params = dict(table)
    cluster = params.pop("cluster", "slurm")
    if cluster == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise EngineError(
            "--launcher slurm: no SLURM here (`sbatch`/`srun` not found); run it on a login node of the cluster, "
            'or try the path locally with `[sweep.slurm] cluster = "local"`'
        )
    generic = set(submitit.AutoExecutor._typed_parameters())
    known = submitit.SlurmExecutor._valid_parameters()
    kwargs: dict[str, Any] = {"name": name, "timeout_min": DEFAULT_TIMEOUT_MIN}
    if "time" in params or "slurm_time" in params:
        del kwargs["timeout_min"]  # the user's SLURM `time` wins
    if parallel and parallel > 1:
        kwargs["slurm_array_parallelism"] = parallel
    problems = []
    for key, value in params.items():
        bare = key.removeprefix("slurm_")
        if key in generic:
            kwargs[key] = value
        elif bare in known:
            kwargs[f"slurm_{bare}"] = value
        else:
            hint = "submitit's names: " + ", ".join(sorted(generic | known))
            problems.append(Problem(f"sweep.slurm.{key}", f"unknown SLURM parameter `{key}`", hint))
    if problems:
        raise RecipeError(problems)
    return cluster, kwargs


class ExperimentJob(submitit.helpers.Checkpointable):
    """The callable a SLURM task runs: the experiment's command, output appended to its console log."""

    def __init__(self, task: Task, grace_s: float = 60.0) -> None:
        # no os.environ copy: the task runs with the environment of its compute node
        self.task = task
        self.grace_s = grace_s  # below SLURM's signal delay (submitit: 90 s) so the checkpoint gets written
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        task = self.task
        task.dir.mkdir(parents=True, exist_ok=True)
        with open(task.log, "a", encoding="utf-8") as log:
            command = with_free_port(task.command)
            log_header(command, log)
            self._proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **task.env},
                start_new_session=True,
            )
            return self._proc.wait()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        if self._proc is not None and self._proc.poll() is None:
            stop_processes([self._proc], self.grace_s)
        return super().checkpoint(*args, **kwargs)  # the same command again: it resumes from the checkpoint

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None}  # a process handle does not travel to the requeued job


@contextlib.contextmanager
def _importable_for_jobs(env: dict[str, str]):
    """Jobs unpickle ExperimentJob, so they need accelengine importable: sbatch and the local executor copy the
    submitting environment, so put the experiments' PYTHONPATH in it while submitting."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env.get("PYTHONPATH", before or "")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def run_slurm(
    tasks: list[Task],
    folder: Path,
    table: dict[str, Any],
    parallel: int | None,
    name: str,
    on_start: OnStart,
    on_finish: OnFinish,
) -> None:
    """Submit every task as one job array and wait for all of them, reporting each as it ends. On Ctrl-C the
    jobs are cancelled (SLURM signals them: they checkpoint), so the same command resumes them later."""
    if not tasks:
        return
    cluster, kwargs = executor_parameters(table, parallel, name)
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    try:
        executor.update_parameters(**kwargs)
    except (NameError, AssertionError, ValueError) as err:  # submitit's own checks of values
        raise RecipeError(Problem("sweep.slurm", f"submitit refused the parameters: {err}")) from None
    try:
        with _importable_for_jobs(tasks[0].env):
            jobs = executor.submit_array([ExperimentJob(t) for t in tasks])
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:  # sbatch refused (partition, account...)
        raise EngineError(f"submitting the job array failed: {err}") from None
    running = dict(zip(jobs, tasks, strict=True))
    for job, task in running.items():
        on_start(task, f"job {job.job_id}")
    with stop_on_signals():
        try:
            while running:
                for job, task in list(running.items()):
                    if not job.done():
                        continue
                    del running[job]
                    try:
                        code, why = job.result(), ""
                    except Exception as err:  # the job itself failed (node failure, out of memory, cancelled...)
                        code, why = None, (str(err).strip().splitlines() or [repr(err)])[-1]
                    on_finish(task, code, why)
                time.sleep(_POLL_S)
        except BaseException:
            for job in running:
                with contextlib.suppress(Exception):
                    job.cancel(check=False)
            raise


__all__ = ["executor_parameters", "run_slurm"]
