"""Experiment trackers (TensorBoard, W&B, MLflow, Aim, Comet, ...) through Accelerate's own integrations.

The tracker names reach `Accelerator(log_with=..., project_config=...)` when the engine builds it (see
`accelerator_kwargs`); this callback starts the trackers' run (`accelerator.init_trackers`), forwards every logged
record (`accelerator.log`) and finishes them. Train and eval values keep their split prefix as the tag
(`train/loss`, `val/loss`), so the curves stay apart. Nothing here imports a tracker package: Accelerate does, on the
main process, when the run starts.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelengine.callbacks.base import Callback
from accelengine.errors import EngineError, Problem

if TYPE_CHECKING:
    from accelengine.engine import Engine
    from accelengine.recipe.schema import LogSection

logger = logging.getLogger("accelengine")

# Tracker name -> the module that must be importable for it (what Accelerate's own availability checks look for).
TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "aim": ("aim",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "swanlab": ("swanlab",),
    "trackio": ("trackio",),
}
# Where trackers that keep local files write them, inside the run directory.
TRACKER_DIR = "trackers"


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in TRACKER_PACKAGES.get(name, (name,)))


def log_section_problems(log: LogSection) -> list[Problem]:
    """Recipe checks for `[log]`: known tracker names, installed packages, sane numbers."""
    problems = []
    for i, name in enumerate(log.trackers or []):
        if name not in TRACKER_PACKAGES:
            known = ", ".join(f"`{n}`" for n in TRACKER_PACKAGES)
            problems.append(Problem(f"log.trackers[{i}]", f"unknown tracker `{name}`", f"choose from {known}"))
        elif not _installed(name):
            problems.append(Problem(f"log.trackers[{i}]", f"tracker `{name}` is not installed", f"pip install {name}"))
    for name in log.tracker_kwargs:
        if name not in (log.trackers if log.trackers is not None else ["tensorboard"]):
            problems.append(
                Problem(f"log.tracker_kwargs.{name}", f"`{name}` is not one of `log.trackers`", "add it to the list")
            )
    if not log.progress_every_s >= 0:  # nan too: it would silence the plain progress lines
        problems.append(Problem("log.progress_every_s", f"must be 0 or more, got {log.progress_every_s}"))
    return problems


def resolve_trackers(log: LogSection, out_dir: Path | None) -> list[str]:
    """The tracker names a run uses: the configured ones, or TensorBoard when it is installed and there is a run
    directory to write to. Raises EngineError for unknown or missing trackers (the recipe validator says the same)."""
    if log.trackers is None:
        return ["tensorboard"] if out_dir is not None and _installed("tensorboard") else []
    problems = log_section_problems(log)
    if problems:
        raise EngineError("; ".join(f"{p.path}: {p.message} ({p.hint})" for p in problems))
    needs_dir = [n for n in log.trackers if n in ("tensorboard", "aim")]
    if needs_dir and out_dir is None:
        raise EngineError(f"tracker(s) {needs_dir} write files: give the engine an `out_dir`")
    return list(dict.fromkeys(log.trackers))


def accelerator_kwargs(log: LogSection, out_dir: Path | None) -> dict[str, Any]:
    """What `Accelerator(...)` needs for the trackers: `log_with` and where local trackers write."""
    names = resolve_trackers(log, out_dir)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    kwargs: dict[str, Any] = {"log_with": names}
    if out_dir is not None:
        kwargs["project_config"] = ProjectConfiguration(
            project_dir=str(out_dir), logging_dir=str(Path(out_dir) / TRACKER_DIR)
        )
    return kwargs


# How each tracker's run is identified, and the init arguments that reopen that run on resume.
_RUN_IDS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], dict[str, Any]]]] = {
    "tensorboard": (lambda t: t.logging_dir, lambda v: {}),
    "wandb": (lambda t: t.run.id, lambda v: {"id": v, "resume": "allow"}),
    "mlflow": (lambda t: t.active_run.info.run_id, lambda v: {"run_id": v}),
    "aim": (lambda t: t.writer.hash, lambda v: {"run_hash": v}),
    "comet_ml": (lambda t: t.writer.get_key(), lambda v: {"experiment_key": v}),
}


def _after_earlier_event_files(event_dir: Path, longest_wait_s: float = 2.0) -> None:
    """Wait, if need be, until a new TensorBoard event file's name sorts after those already in `event_dir`.

    TensorBoard reads a directory's event files in name order, and a name is `events.out.tfevents.<seconds>.<host>.
    <pid>.<n>`: a second file of the same process in the same second can sort first (`.10` before `.9`), and its
    events then read as older than the earlier attempt's, whose purge would drop them. Only a run resumed in the
    process that wrote the directory, within the same second, waits (under a second)."""
    seconds = []
    for path in event_dir.glob("events.out.tfevents.*"):
        field = path.name.split(".")[3]
        if field.isdigit():
            seconds.append(int(field))
    if seconds:
        wait = max(seconds) + 1 - time.time()
        if 0 < wait <= longest_wait_s:  # a later stamp than that is another machine's clock: waiting would not help
            time.sleep(wait)


def _flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested recipe as the flat `{"optim.lr": 0.001}` mapping trackers accept as hyperparameters."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_flat_config(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(data, (bool, int, float, str)) or data is None:
        out[prefix] = data
    else:
        out[prefix] = str(data)
    return out


class Trackers(Callback):
    """Logs every record to the trackers Accelerate was built with (`engine.accelerator.log_with`).

    The trackers' run starts in `before_fit` (or at the first record, for an `evaluate()` without `fit`), after a
    resume has restored this callback's state (`load_state_dict`), so a resumed run reopens the same run: W&B by id,
    MLflow by run id, Aim by run hash, Comet by experiment key, TensorBoard by its directory, relative to the run
    directory (events the interrupted run logged from the resumed step on are purged, so its tail is not doubled,
    and the records the checkpoint says were logged at that step are logged again).
    """

    def __init__(self, project: str | None = None, tracker_kwargs: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.project = project
        self.tracker_kwargs = dict(tracker_kwargs or {})
        self._started = False
        self._closed = False
        self._restored: dict[str, Any] = {}
        # What was logged at the latest step, checkpointed: a resume from that step purges the step from TensorBoard
        # (what the interrupted run logged there after the checkpoint would otherwise show twice) and logs these again.
        self._latest_step = -1
        self._at_latest: list[dict[str, Any]] = []
        self._latest_known = True  # False after restoring a checkpoint written before these were kept
        self.run_project: str | None = None
        self.runs: dict[str, Any] = {}  # tracker name -> run id (TensorBoard: its directory), once started

    @property
    def key(self) -> str:
        return "trackers"

    def _start(self, engine: Engine) -> None:
        self._started = True
        acc = engine.accelerator
        if not acc.log_with or not engine.is_main_process:
            return
        init_kwargs = {name: dict(kw) for name, kw in self.tracker_kwargs.items()}
        restored = self._restored.get("runs") or {}
        for name, run_id in restored.items():
            if name in _RUN_IDS and run_id is not None:
                init_kwargs.setdefault(name, {}).update(_RUN_IDS[name][1](run_id))
        if restored.get("tensorboard"):
            # the same event directory as before (a resume)
            event_dir = Path(engine.out_dir or ".") / restored["tensorboard"]  # stays put when already absolute
            acc.project_configuration.logging_dir = str(event_dir.parent)
        # Events an earlier attempt in this directory logged from the step this run starts at are dropped, so
        # curves are not doubled: after a resume, and on a fresh start over a run that died before its first
        # checkpoint (`metrics.jsonl` is rewound alike). The step itself goes too: the interrupted run may have
        # logged there after the checkpoint (the evaluation at the end of an epoch, after a save at its last step),
        # and this run logs that again; what came before the checkpoint is logged again below.
        start = engine.state.step
        init_kwargs.setdefault("tensorboard", {})["purge_step"] = start if self._latest_known else start + 1
        name = (engine.recipe or {}).get("name")
        self.run_project = self._restored.get("project") or self.project or name or "accelengine"
        config = _flat_config(engine.recipe) if engine.recipe else {"seed": engine.seed}
        if "tensorboard" in [str(getattr(t, "value", t)) for t in acc.log_with]:
            _after_earlier_event_files(Path(acc.project_configuration.logging_dir or ".") / self.run_project)
        acc.init_trackers(self.run_project, config=config, init_kwargs=init_kwargs)
        if self._latest_step != start:
            self._latest_step, self._at_latest = start, []
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                for values in self._at_latest:
                    tracker.log(values, step=start)
            getter = _RUN_IDS.get(tracker.name)
            try:
                self.runs[tracker.name] = getter[0](tracker) if getter else None
            except AttributeError:
                self.runs[tracker.name] = None
        if self.runs.get("tensorboard") and engine.out_dir is not None:
            # relative to the run directory, so a run directory that is moved or copied still resumes in place
            event_dir = Path(self.runs["tensorboard"])
            if event_dir.is_relative_to(engine.out_dir):
                self.runs["tensorboard"] = str(event_dir.relative_to(engine.out_dir))
        engine.summary_extras["trackers"] = dict(self.runs)

    def before_fit(self, engine: Engine) -> None:
        self._closed = False
        if not self._started:  # a resume has restored the loop position (and this state) by now
            self._start(engine)  # here rather than at the first record: starting a run takes tens of ms

    def on_log(self, engine: Engine, record: dict[str, Any]) -> None:
        if self._closed:
            return
        if not self._started:
            self._start(engine)
        if engine.accelerator.trackers:
            values = {k: v for k, v in record.items() if "/" in k and isinstance(v, (int, float))}
            step = record["step"]
            engine.accelerator.log(values, step=step)
            if step != self._latest_step:
                self._latest_step, self._at_latest = step, []
            self._at_latest.append(values)

    def after_fit(self, engine: Engine) -> None:
        # `accelerator.end_training()` would also destroy the process group, which callbacks after this one (a
        # final checkpoint) may still need; finishing each tracker is the tracker half of it.
        for tracker in engine.accelerator.trackers:
            tracker.finish()
        engine.accelerator.trackers.clear()
        self._started, self._closed = False, True

    def state_dict(self) -> dict[str, Any]:
        latest = {"step": self._latest_step, "records": [dict(v) for v in self._at_latest]}
        return {"project": self.run_project or self.project, "runs": dict(self.runs), "latest": latest}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = {"project": state.get("project"), "runs": dict(state.get("runs") or {})}
        self.runs = dict(self._restored["runs"])
        self._latest_known = "latest" in state
        latest = state.get("latest") or {}
        self._latest_step = int(latest.get("step", -1))
        self._at_latest = [dict(v) for v in latest.get("records") or ()]
