"""NanGuard: a non-finite loss stops the run naming the step (nothing saved after it), or its updates are skipped."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from accelengine import Callback, CheckpointConfig, Engine, LogConfig
from accelengine.callbacks import NanGuard

from .helpers import tiny_engine, weights
from .test_ema import Snapshots


class NanAt(Engine):
    """The loss is NaN for the optimizer steps (1-based) in `bad`, from step `bad_from` on, or for the batches
    (1-based, in the epoch) in `bad_batches`."""

    bad: frozenset[int] = frozenset()
    bad_from: float = float("inf")
    bad_batches: frozenset[int] = frozenset()

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        step = self.state.step + 1  # the optimizer step this batch belongs to
        if step in self.bad or step >= self.bad_from or self.state.batch_in_epoch in self.bad_batches:
            return loss * float("nan")
        return loss


def kept_on_device(engine):
    """The engine as on an accelerator: losses kept as device tensors, not read as floats when made (the hooks are
    bound again, as setup binds them after choosing: on the host the guard's per-step hook is idle)."""
    engine.setup()
    engine._read_losses_on_host(False)
    engine._bind_hooks()
    return engine


def nan_from(step: int) -> type[NanAt]:
    return type("NanFrom", (NanAt,), {"bad_from": step})


@pytest.mark.parametrize("on_host", [True, False], ids=["host-floats", "device-tensors"])
def test_stop_names_the_step_and_waits_for_the_log_step(on_host):
    engine = tiny_engine(nan_from(3), steps=12, log_every=4, eval_every=100)
    summary = (engine if on_host else kept_on_device(engine)).fit()
    assert summary["status"] == "failed"
    assert summary["stop_reason"].startswith("non-finite loss (nan) at step 3 (epoch 0)")
    assert "max_grad_norm" in summary["stop_reason"]  # the fixes are named
    # on a device: found at the log step, not earlier (no read-back per step); on the host every loss is read
    # anyway, so the run stops at the bad step itself
    assert summary["steps"] == (3 if on_host else 4)


@pytest.mark.parametrize("on_host", [True, False], ids=["host-floats", "device-tensors"])
def test_stop_keeps_the_last_good_checkpoint_the_latest(tmp_path, on_host):
    engine = tiny_engine(
        nan_from(5), out_dir=tmp_path, steps=12, log_every=4, eval_every=100, checkpoint=CheckpointConfig(every_steps=2)
    )
    summary = (engine if on_host else kept_on_device(engine)).fit()
    assert summary["status"] == "failed" and "at step 5" in summary["stop_reason"]
    # on a device: checked at step 6 because a checkpoint was due there, and none was written; on the host: at once
    assert summary["steps"] == (5 if on_host else 6)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == ["step-00000002", "step-00000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip().endswith("step-00000004")


def test_skip_drops_exactly_the_bad_updates():
    snaps = Snapshots()
    cls = type("NanAt35", (NanAt,), {"bad": {3, 5}})
    guard = NanGuard(mode="skip")
    summary = tiny_engine(cls, callbacks=[guard, snaps], steps=6, log_every=2).fit()
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert guard.skipped == [3, 5]
    assert summary["skipped_steps"] == {"count": 2, "first": [3, 5]}
    for step in range(1, 7):
        before, after = snaps.seen[step - 1], snaps.seen[step]
        assert torch.equal(before["0.weight"], after["0.weight"]) == (step in (3, 5)), step
    assert all(torch.isfinite(v).all() for v in snaps.seen[-1].values())


def test_skip_sees_every_micro_batch_of_an_accumulation():
    snaps = Snapshots()
    cls = type("NanBatch3", (NanAt,), {"bad_batches": {3}})  # the first of the two micro-batches of step 2
    guard = NanGuard(mode="skip")
    tiny_engine(cls, callbacks=[guard, snaps], steps=3, grad_accum=2).fit()
    assert guard.skipped == [2]
    # after_fit_step sees every micro-batch: seen[2] is after step 1, seen[4] after step 2, seen[6] after step 3
    assert torch.equal(snaps.seen[4]["0.weight"], snaps.seen[2]["0.weight"])
    assert not torch.equal(snaps.seen[6]["0.weight"], snaps.seen[4]["0.weight"])


def test_skip_from_the_log_section_and_off():
    engine = tiny_engine(log=LogConfig(progress=False, nan_guard="skip"))
    (guard,) = [cb for cb in engine.callbacks if isinstance(cb, NanGuard)]
    assert guard.mode == "skip"
    engine = tiny_engine(log=LogConfig(progress=False, nan_guard="off"))
    assert not any(isinstance(cb, NanGuard) for cb in engine.callbacks)
    summary = tiny_engine(nan_from(2), log=LogConfig(progress=False, nan_guard="off"), steps=4).fit()
    assert summary["status"] == "completed"  # unguarded: trains on


def test_state_round_trip():
    guard = NanGuard(mode="skip")
    guard.skipped = [3, 9]
    other = NanGuard(mode="skip")
    other.load_state_dict(guard.state_dict())
    assert other.skipped == [3, 9]


def test_weights_untouched_before_training():
    engine = tiny_engine(nan_from(1), steps=1)
    w0 = weights(engine)
    summary = engine.fit()
    assert summary["status"] == "failed" and "at step 1" in summary["stop_reason"]
    assert set(w0) == set(weights(engine))


@pytest.mark.parametrize("on_host", [True, False], ids=["host-floats", "device-tensors"])
def test_stop_at_the_end_of_an_epoch_before_its_evaluation(on_host):
    # on a device, with no log step inside the epoch, the epoch's end (evaluation, maybe a checkpoint) is where it
    # is found; on the host, at the bad step
    engine = tiny_engine(nan_from(2), epochs=3, log_every=100)
    summary = (engine if on_host else kept_on_device(engine)).fit()
    assert summary["status"] == "failed" and "at step 2 (epoch 0)" in summary["stop_reason"]
    assert summary["steps"] == (2 if on_host else 4) and summary["epochs"] == 0  # stopped before the epoch closed


@pytest.mark.parametrize("on_host", [True, False], ids=["host-floats", "device-tensors"])
def test_stop_names_the_step_across_short_accumulation_steps(on_host):
    # 4 batches per epoch, 3 per step: each epoch ends with a short step of one batch (steps 2, 4, 6, ...), so the
    # kept losses are not 3 per step; the NaN of step 5 (epoch 2), found at the last step, is still named exactly
    cls = type("NanAt5", (NanAt,), {"bad": frozenset({5})})
    engine = tiny_engine(cls, steps=8, grad_accum=3, log_every=100, eval_every=100)
    summary = (engine if on_host else kept_on_device(engine)).fit()
    assert summary["status"] == "failed" and "at step 5 (epoch 2)" in summary["stop_reason"]


def test_host_check_reports_the_first_bad_micro_batch_once(capsys):
    # every micro-batch from step 2 on is NaN (3 per step, then the log record too): one report, naming step 2
    engine = tiny_engine(nan_from(2), steps=6, grad_accum=3, log_every=2, eval_every=100)
    summary = engine.fit()
    assert summary["status"] == "failed" and "at step 2 (epoch 0)" in summary["stop_reason"]
    assert summary["steps"] == 2 and capsys.readouterr().out.count("stopping: non-finite loss") == 1


class BadValues(Engine):
    """The loss is infinite at optimizer step 2 and NaN at step 5, with zero gradients (the weights stay finite, so
    the other steps' losses do too)."""

    def compute_loss(self, batch):
        loss = super().compute_loss(batch)
        bad = {2: float("inf"), 5: float("nan")}.get(self.state.step + 1)
        return loss if bad is None else loss * 0.0 + bad


@pytest.mark.parametrize("on_host", [True, False], ids=["host-floats", "device-tensors"])
def test_the_engine_tells_of_each_nonfinite_host_loss_and_runs_no_guard_hook_per_step(on_host):
    # the guard is off: the run goes on, and a callback sees each bad value with its step, as soon as it is read;
    # the engine tells only where it reads every loss anyway (on a device the guard reads them back itself)
    from accelengine import Callback

    class Told(Callback):
        def __init__(self):
            super().__init__()
            self.seen = []

        def on_nonfinite_loss(self, engine, value):
            self.seen.append((engine.state.step + 1, str(value)))

    told = Told()
    engine = tiny_engine(BadValues, callbacks=[told], steps=6, log=LogConfig(nan_guard="off"))
    summary = (engine if on_host else kept_on_device(engine)).fit()
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert told.seen == ([(2, "inf"), (5, "nan")] if on_host else [])
    # with the guard on, one CPU process dispatches none of its per-step hooks: the engine's report is enough
    guard = CountingGuard()
    guarded = tiny_engine(BadValues, callbacks=[guard], steps=6)  # takes the built-in guard's place
    summary = (guarded if on_host else kept_on_device(guarded)).fit()
    assert summary["status"] == "failed" and "at step 2 (epoch 0)" in summary["stop_reason"]
    assert guard.calls == (0 if on_host else 2)  # on a device it keeps each step's loss itself


class CountingGuard(NanGuard):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def fit_step(self, engine):
        self.calls += 1
        super().fit_step(engine)


class Unsized(torch.utils.data.IterableDataset):
    """The tiny run's training set streamed: epochs of 4 batches whose number nothing can know ahead."""

    def __init__(self, base):
        self.base = base

    def __iter__(self):
        return iter(self.base)


@pytest.mark.parametrize("on_host", [True, False], ids=["host-floats", "device-tensors"])
def test_epochs_of_a_train_set_without_a_length(tmp_path, on_host):
    # the total of steps is unknown ahead: a clean run completes (no check every step, no error), and on a device a
    # NaN of epoch 1 is found at its end, before the checkpointer's epoch-end save
    def run(cls, out_dir=None):
        engine = tiny_engine(
            cls, epochs=3, log_every=100, out_dir=out_dir, checkpoint=CheckpointConfig(every_epochs=1, at_end=False)
        )
        engine.loaders["train"] = Unsized(engine.loaders["train"])
        engine = engine if on_host else kept_on_device(engine)
        checks = []
        guard = next(cb for cb in engine.callbacks if isinstance(cb, NanGuard))
        first_bad = guard._first_bad
        guard._first_bad = lambda e: checks.append(e.state.step) or first_bad(e)
        return engine.fit(), checks

    summary, checks = run(NanAt)
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert checks == ([] if on_host else [4, 8, 12])  # once per epoch, at its end
    summary, _ = run(nan_from(6), tmp_path)
    assert summary["status"] == "failed" and "at step 6 (epoch 1)" in summary["stop_reason"]
    assert summary["steps"] == (6 if on_host else 8)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == ["step-00000004"]


def test_a_resumed_run_summarises_the_steps_skipped_before_it(tmp_path):
    from .test_trackers import Crash  # raises after step 6

    cls = type("NanAt3", (NanAt,), {"bad": {3}})
    ckpt = CheckpointConfig(every_steps=4, at_end=False)
    skip = LogConfig(progress=False, nan_guard="skip")
    straight = tiny_engine(cls, out_dir=tmp_path / "a", steps=8, checkpoint=ckpt, log=skip).fit()
    assert straight["skipped_steps"] == {"count": 1, "first": [3]}
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_engine(cls, callbacks=[Crash()], out_dir=tmp_path / "b", steps=8, checkpoint=ckpt, log=skip).fit()
    resumed = tiny_engine(
        cls,
        out_dir=tmp_path / "b",
        steps=8,
        checkpoint=ckpt,
        log=skip,
        resume_from=tmp_path / "b" / "checkpoints" / "step-00000004",
    ).fit()
    assert resumed["steps"] == 8 and resumed["skipped_steps"] == straight["skipped_steps"]


class PreemptAt(Callback):
    """Sends this process SIGTERM at the end of optimizer step `step`, as a scheduler would."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def after_fit_step(self, engine):
        if engine.state.optimizer_stepped and engine.state.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_preemption_between_checks_saves_no_damaged_weights(tmp_path):
    # On a device the losses since the last check (step 0; the next is the log step 8) are not read back yet when the
    # signal comes at step 5: they are, before the preemption's checkpoint would be saved.
    engine = tiny_engine(nan_from(3), out_dir=tmp_path, steps=12, log_every=8, eval_every=100, callbacks=[PreemptAt(5)])
    summary = kept_on_device(engine).fit()
    assert summary["status"] == "failed" and summary["steps"] == 5, summary
    assert summary["stop_reason"].startswith("non-finite loss (nan) at step 3 (epoch 0)"), summary
    checkpoints = tmp_path / "checkpoints"
    assert not checkpoints.exists() or not any(p.name.startswith("step-") for p in checkpoints.iterdir())
