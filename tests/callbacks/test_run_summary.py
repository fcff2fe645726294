"""RunSummary: best metric and when, stop reason, speed; printed and written to summary.json."""

from __future__ import annotations

import json

import pytest

from accelengine import CheckpointConfig, LogConfig
from accelengine.callbacks import EarlyStopping, RunSummary
from accelengine.callbacks.progress import lower_is_better

from .helpers import Recorder, tiny_engine


def test_best_is_tracked_and_printed(tmp_path, capsys):
    rec = Recorder()
    engine = tiny_engine(callbacks=[rec], out_dir=tmp_path, steps=6, eval_every=2, log=LogConfig(progress=False))
    summary = engine.fit()
    accuracies = rec.values("val/accuracy")
    best_step, best = max(accuracies, key=lambda sv: (sv[1], -sv[0]))
    assert summary["best"]["metric"] == "val/accuracy" and summary["best"]["mode"] == "max"
    assert (summary["best"]["step"], summary["best"]["value"]) == (best_step, best)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["best"] == summary["best"] and on_disk["status"] == "completed"
    out = capsys.readouterr().out
    assert "run completed in 0:00:0" in out and "6 steps" in out and "steps/s" in out
    assert f"best val/accuracy {best:.4g} at step {best_step}" in out


def test_monitor_from_the_checkpoint_section_and_the_stop_reason(capsys):
    stopper = EarlyStopping("val/loss", patience=1)
    engine = tiny_engine(
        callbacks=[stopper], lr=0.0, steps=10, eval_every=1, checkpoint=CheckpointConfig(monitor="val/loss", mode="min")
    )
    summary = engine.fit()
    assert summary["best"]["metric"] == "val/loss" and summary["best"]["mode"] == "min"
    assert summary["best"]["step"] == 1
    assert "stop reason: early stopping: val/loss" in capsys.readouterr().out


def test_state_round_trip_and_quiet_mode(capsys):
    a = RunSummary()
    a.best = {"metric": "val/loss", "mode": "min", "value": 0.5, "step": 3, "epoch": 1}
    b = RunSummary(print_summary=False)
    b.load_state_dict(a.state_dict())
    assert b.best == a.best
    tiny_engine(callbacks=[b], steps=1, log=LogConfig(progress=False, console=False, param_table=False)).fit()
    assert "run completed" not in capsys.readouterr().out


def test_direction_from_the_name():
    assert lower_is_better("val/loss") and lower_is_better("val/word_error") and lower_is_better("test/ppl")
    assert lower_is_better("val/nll") and lower_is_better("val/token_nll")
    assert not lower_is_better("val/accuracy") and not lower_is_better("val/f1") and not lower_is_better("val/lossless")


def test_the_speed_of_a_resumed_run_counts_the_steps_it_made(tmp_path):
    from accelengine import Callback

    class Crash(Callback):
        def after_fit_step(self, engine):
            if engine.state.step == 6:
                raise RuntimeError("simulated crash")

    class LongAgo(Callback):
        def before_fit(self, engine):
            engine.start_time -= 100.0  # as if this attempt had run 100 s: its speed is then about 4 / 100 steps/s

    quiet = LogConfig(progress=False, console=False, param_table=False, summary=False, trackers=[])
    checkpoints = CheckpointConfig(every_steps=4, at_end=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_engine(callbacks=[Crash()], out_dir=tmp_path, steps=8, checkpoint=checkpoints, log=quiet).fit()
    resumed = tiny_engine(
        callbacks=[LongAgo()],
        out_dir=tmp_path,
        steps=8,
        checkpoint=checkpoints,
        log=quiet,
        resume_from=tmp_path / "checkpoints" / "step-00000004",
    )
    summary = resumed.fit()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for s in (summary, on_disk):
        assert s["steps"] == 8  # the run's position...
        assert s["steps_per_s"] == pytest.approx(4 / s["wall_time_s"], rel=0.01)  # ...its speed: the 4 steps made
