"""Real processes killed with real signals, re-run with the same command: the result is bit-identical."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accelengine import Callback
from accelengine.checkpoint import find_latest
from accelengine.preemption import EXIT_PREEMPTED

from .conftest import ROOT, launch_command, launch_env

SLOW = """
import time
from accelengine import Callback

class Slow(Callback):
    '''Makes a tiny run last long enough to be killed at a chosen moment.'''
    def __init__(self, seconds: float = 0.02):
        super().__init__()
        self.seconds = seconds

    def after_fit_step(self, engine):
        time.sleep(self.seconds)
"""

RECIPE = """
name = "killable"
seed = 3
model = {{ _component_ = "mlp", in_features = 16, hidden = [{hidden}], out_features = 4, dropout = 0.1 }}
loss = "cross_entropy"
optim = {{ _component_ = "adamw", lr = 1e-3 }}
scheduler = {{ _component_ = "cosine", warmup_steps = 5 }}
[[callbacks]]
_component_ = "slow.Slow"
seconds = {sleep}
[metrics]
accuracy = "accuracy"
[data]
batch_size = 8
[data.train]
dataset = {{ _component_ = "synthetic_classification", samples = 100 }}
[data.val]
dataset = {{ _component_ = "synthetic_classification", samples = 40, seed = 1 }}
[trainer]
steps = {steps}
log_every = 1
eval_every = 10
grad_accum = {accum}
device = "cpu"
[checkpoint]
every_steps = {every}
keep_last = 2
[log]
progress = false
"""


def write_recipe(tmp_path, *, hidden=64, sleep=0.02, steps=40, accum=1, every=3):
    (tmp_path / "slow.py").write_text(SLOW)
    path = tmp_path / f"r{hidden}-{accum}.toml"
    path.write_text(RECIPE.format(hidden=hidden, sleep=sleep, steps=steps, accum=accum, every=every))
    return path


def command(recipe, out, processes=1):
    if processes == 1:
        return [sys.executable, "-m", "accelengine", "run", str(recipe), "--out", str(out)]
    return launch_command(processes, "run", str(recipe), "--out", str(out))


def env():
    return launch_env()


def start(recipe, out, processes=1):
    return subprocess.Popen(
        command(recipe, out, processes),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(recipe, out, processes=1):
    res = subprocess.run(
        command(recipe, out, processes), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def final_state(out):
    ckpt = find_latest(Path(out) / "checkpoints")
    return load_file(ckpt / "model.safetensors"), load_file(ckpt / "optimizer.safetensors")


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    keys = ("train/loss", "train/lr", "val/loss", "val/accuracy")
    return [(r["step"], {k: r[k] for k in keys if k in r}) for r in rows if any(k in r for k in keys)]


def assert_same_run(a, b):
    (ma, oa), (mb, ob) = final_state(a), final_state(b)
    assert ma.keys() == mb.keys() and oa.keys() == ob.keys()
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert losses(a) == losses(b)


@pytest.mark.slow
def test_sigkill_anywhere_even_while_saving(tmp_path):
    # a wider model makes each save take a while, so the kills below land inside checkpoint writes
    recipe = write_recipe(tmp_path, hidden=1024, sleep=0.0, steps=30, every=2)
    finish(recipe, tmp_path / "straight")
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    kills_during_save = 0
    delays = [random.uniform(0.3, 2.5) for _ in range(2)]
    print("random kill delays after the first checkpoint:", delays)  # to replay a failure
    for attempt in range(4):
        proc = start(recipe, out)
        if attempt % 2 == 0:  # at a random instant
            wait_for(lambda: find_latest(ckpts) is not None)
            time.sleep(delays[attempt // 2])
            in_save = False
        else:  # while a save is in flight (a temporary directory exists)
            in_save = wait_for(lambda: ckpts.is_dir() and any(p.name.startswith(".tmp-") for p in ckpts.iterdir()))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills_during_save += in_save and any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert kills_during_save >= 1  # the interesting case really happened
    finish(recipe, out)
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
    assert_same_run(tmp_path / "straight", out)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_then_resumes(tmp_path):
    recipe = write_recipe(tmp_path, sleep=0.03, steps=30, accum=2)
    finish(recipe, tmp_path / "straight")
    out = tmp_path / "preempted"
    proc = start(recipe, out)
    assert wait_for(lambda: find_latest(out / "checkpoints") is not None)
    time.sleep(0.2)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "must stop within seconds, not at the end of the epoch"
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted" and 0 < summary["steps"] < 30
    assert find_latest(out / "checkpoints").name == f"step-{summary['steps']:08d}"
    finish(recipe, out)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert_same_run(tmp_path / "straight", out)


@pytest.mark.slow
def test_sigusr1_to_the_launcher_reaches_both_processes_when_the_launcher_is_told_to_pass_it_on(tmp_path, monkeypatch):
    """The SLURM set-up of docs/checkpoints.md: the signal goes to `accelerate launch`, not to the engine's processes,
    and the launcher passes SIGUSR1 on only when `PET_SIGNALS_TO_HANDLE` names it."""
    monkeypatch.setenv("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    recipe = write_recipe(tmp_path, sleep=0.03, steps=200)
    out = tmp_path / "preempted"
    proc = start(recipe, out, processes=2)
    assert wait_for(lambda: find_latest(out / "checkpoints") is not None)
    os.kill(proc.pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["world_size"] == 2 and summary["steps"] < 200, output[-3000:]
    assert summary["stop_reason"] == "preempted by SIGUSR1"
    assert find_latest(out / "checkpoints").name == f"step-{summary['steps']:08d}"


@pytest.mark.slow
def test_two_processes_sigterm_to_one_rank(tmp_path):
    import psutil

    recipe = write_recipe(tmp_path, sleep=0.03, steps=16, accum=2)
    finish(recipe, tmp_path / "straight", processes=2)
    out = tmp_path / "preempted"
    proc = start(recipe, out, processes=2)
    assert wait_for(lambda: find_latest(out / "checkpoints") is not None)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "accelengine" in " ".join(p.cmdline())]
    assert len(workers) == 2
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGTERM)  # only one rank gets the signal: both must agree to stop at the same step
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["world_size"] == 2
    finish(recipe, out, processes=2)
    assert_same_run(tmp_path / "straight", out)


class SignalDuringEval(Callback):
    """Sends SIGTERM to this very process in the middle of the first evaluation at `step`."""

    def __init__(self, step):
        super().__init__()
        self.step, self.sent = step, False

    def after_eval_step(self, engine):
        if engine.state.step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_inside_evaluation(tmp_path):
    from tests.test_restart import build, logged

    straight = build(tmp_path / "straight", steps=12)
    straight.fit()
    out = tmp_path / "run"
    first = build(out, steps=12, callbacks=[SignalDuringEval(step=4)])
    summary = first.fit()
    assert summary["status"] == "preempted" and summary["steps"] == 4
    assert first.state.last_eval_step != 4  # the interrupted evaluation was not recorded as done
    resumed = build(out, steps=12, resume=find_latest(out / "checkpoints"))
    resumed.fit()
    for k, v in straight.unwrapped_model().state_dict().items():
        assert torch.equal(v, resumed.unwrapped_model().state_dict()[k])
    assert logged(out) == logged(tmp_path / "straight")


class SignalAt(Callback):
    """Sends SIGTERM to this very process at the end of the given micro-batch (1-based), after every built-in
    callback has seen that micro-batch."""

    def __init__(self, batch):
        super().__init__()
        self.batch, self.seen = batch, 0

    def after_fit_step(self, engine):
        self.seen += 1
        if self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize(("grad_accum", "batch", "stop_step"), [(None, 5, 5), (2, 7, 4), (2, 8, 4)])
def test_one_process_stops_at_the_end_of_the_step_the_signal_came_in(tmp_path, capsys, grad_accum, batch, stop_step):
    # One process polls nothing per step: the signal handler flags the loop, which stops at the end of this very step
    # (with accumulation, at the end of the whole step, never between its micro-batches) and checkpoints it.
    from tests.test_restart import build

    straight = build(tmp_path / "straight", steps=10, grad_accum=grad_accum, every_steps=100)
    straight.fit()
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    summary = build(out, steps=10, grad_accum=grad_accum, every_steps=100, callbacks=[SignalAt(batch)]).fit()
    assert summary["status"] == "preempted" and summary["steps"] == stop_step
    assert summary["stop_reason"] == "preempted by SIGTERM"
    assert find_latest(out / "checkpoints").name == f"step-{stop_step:08d}"
    assert capsys.readouterr().out.count(f"SIGTERM received: stopped at step {stop_step} ") == 1
    assert signal.getsignal(signal.SIGTERM) is before  # the handler from before the run is back
    resumed = build(out, steps=10, grad_accum=grad_accum, every_steps=100, resume=find_latest(out / "checkpoints"))
    assert resumed.fit()["status"] == "completed"
    for k, v in straight.unwrapped_model().state_dict().items():
        assert torch.equal(v, resumed.unwrapped_model().state_dict()[k])


class StepsEnded(Callback):
    """The steps whose end (`after_fit_step` after an optimizer step) the callbacks saw."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def after_fit_step(self, engine):
        if engine.state.optimizer_stepped:
            self.steps.append(engine.state.step)


def test_after_a_resume_into_an_interrupted_evaluation_its_step_ends_as_usual(tmp_path):
    from tests.test_restart import build

    straight = StepsEnded()
    build(tmp_path / "straight", steps=6, callbacks=[straight]).fit()
    out = tmp_path / "run"
    before = StepsEnded()
    assert build(out, steps=6, callbacks=[SignalDuringEval(step=4), before]).fit()["status"] == "preempted"
    after = StepsEnded()
    build(out, steps=6, callbacks=[after], resume=find_latest(out / "checkpoints")).fit()
    assert before.steps == [1, 2, 3] and before.steps + after.steps == straight.steps == [1, 2, 3, 4, 5, 6]


def test_a_preempted_slurm_job_is_requeued_only_after_its_checkpoint_is_written(tmp_path, monkeypatch):
    # requeueing makes SLURM end the job: the preemption checkpoint (here written at the end of the run, since the
    # signal came inside an evaluation) must exist by then, with the engine's signal handler still in place
    from tests.test_restart import build

    bin_dir, seen = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    checkpoints = tmp_path / "run" / "checkpoints"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$*; $(cat {checkpoints}/latest 2>/dev/null)" >> {seen}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    for name in ("SLURM_ARRAY_JOB_ID", "ACCELENGINE_NO_REQUEUE", "SUBMITIT_EXECUTOR", "RANK"):
        monkeypatch.delenv(name, raising=False)
    handlers = []

    class HandlerAtEnd(Callback):
        def after_fit(self, engine):
            handlers.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    engine = build(tmp_path / "run", steps=12, every_steps=100, callbacks=[SignalDuringEval(step=4), HandlerAtEnd()])
    assert engine.fit()["status"] == "preempted"
    assert seen.read_text() == "requeue 1234; step-00000004\n"
    assert handlers == [engine.preemption._on_signal] and signal.getsignal(signal.SIGTERM) == before


SIGNALLING_DATA = """
import os
import signal

from accelengine.examples.synthetic import classification


def make():
    if os.environ.get("SEND_WHILE_BUILDING"):  # as a scheduler would, while the run is still being built
        os.kill(os.getpid(), getattr(signal, os.environ["SEND_WHILE_BUILDING"]))
    return classification(samples=64, features=16, classes=4)
"""

BUILT_SLOWLY = """
seed = 5
model = { _component_ = "mlp", in_features = 16, hidden = [8], out_features = 4, dropout = 0.1 }
loss = "cross_entropy"
optim = { _component_ = "adamw", lr = 1e-2 }
[data]
batch_size = 8
[data.train]
dataset = { _component_ = "signalling_data.make" }
[trainer]
steps = 12
log_every = 1
device = "cpu"
[log]
progress = false
trackers = []
"""


def test_a_signal_while_the_engine_sets_up_stops_the_python_api_run_before_its_first_step(tmp_path, make_engine):
    from accelengine import Engine, TrainerConfig

    class SignalledWhileSettingUp(Engine):
        def setup(self):
            if not self._prepared:  # as if restoring a large checkpoint took long enough to be preempted
                os.kill(os.getpid(), signal.SIGUSR1)
            super().setup()

    reached_the_default = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: reached_the_default.append(signum))
    try:
        engine = make_engine(SignalledWhileSettingUp, out_dir=tmp_path, config=TrainerConfig(steps=8, device="cpu"))
        summary = engine.fit()
        assert reached_the_default == []
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert summary["status"] == "preempted" and summary["steps"] == 0
    assert summary["stop_reason"] == "preempted by SIGUSR1"
    assert find_latest(tmp_path / "checkpoints").name == "step-00000000"


def test_a_signal_while_the_run_is_built_stops_it_before_its_first_step_and_it_resumes_exactly(tmp_path, monkeypatch):
    # Before the engine's handler is in place, the signal's default action would end the process: no checkpoint,
    # no exit code 75, no requeue. (The handler below stands in for that default, so that this test survives it.)
    from accelengine import run
    from tests.test_restart import logged

    (tmp_path / "signalling_data.py").write_text(SIGNALLING_DATA)
    recipe = tmp_path / "r.toml"
    recipe.write_text(BUILT_SLOWLY)
    assert run(recipe, out=tmp_path / "straight")["status"] == "completed"
    reached_the_default = []

    def stand_in(signum, frame):
        reached_the_default.append(signum)

    before = signal.signal(signal.SIGUSR1, stand_in)
    try:
        out = tmp_path / "run"
        monkeypatch.setenv("SEND_WHILE_BUILDING", "SIGUSR1")
        summary = run(recipe, out=out)
        monkeypatch.delenv("SEND_WHILE_BUILDING")
        assert reached_the_default == []
        assert signal.getsignal(signal.SIGUSR1) is stand_in  # the run put the handler from before it back
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert summary["status"] == "preempted" and summary["steps"] == 0
    assert summary["stop_reason"] == "preempted by SIGUSR1"
    assert find_latest(out / "checkpoints").name == "step-00000000"
    assert run(recipe, out=out)["status"] == "completed"
    assert_same_run(tmp_path / "straight", out)
    assert logged(out) == logged(tmp_path / "straight")


def test_a_preempted_task_is_not_ended_its_after_task_runs_once_at_the_real_end(tmp_path, make_engine):
    from accelengine import Engine, TrainerConfig

    ended: list[int] = []

    class Tasks(Engine):
        def after_task(self):  # e.g. a continual-learning accuracy row, a replay buffer update: once per task
            ended.append(self.state.step)

    class PreemptAt(Callback):
        def after_fit_step(self, engine):
            if engine.state.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    config = TrainerConfig(steps=8, device="cpu")
    first = make_engine(Tasks, out_dir=tmp_path, config=config, callbacks=[PreemptAt()]).fit()
    assert first["status"] == "preempted" and first["steps"] == 3 and ended == []
    resumed = make_engine(Tasks, out_dir=tmp_path, config=config, resume_from=find_latest(tmp_path / "checkpoints"))
    assert resumed.fit()["status"] == "completed" and ended == [8]
