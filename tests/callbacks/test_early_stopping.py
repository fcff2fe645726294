"""EarlyStopping: stops after `patience` evaluations without improvement; its state round-trips."""

from __future__ import annotations

import pytest

from accelengine import EngineError
from accelengine.callbacks import EarlyStopping

from .helpers import tiny_engine


def test_stops_when_the_metric_stalls():
    # lr 0: nothing changes, so val/loss never improves after the first evaluation
    stopper = EarlyStopping(monitor="val/loss", mode="min", patience=2)
    engine = tiny_engine(callbacks=[stopper], lr=0.0, steps=40, eval_every=2)
    summary = engine.fit()
    assert summary["status"] == "stopped"
    assert summary["steps"] == 6  # evaluations at steps 2 (best), 4 and 6 (no improvement twice)
    assert summary["stop_reason"].startswith("early stopping: val/loss did not improve for 2 evaluations")
    assert "at step 2" in summary["stop_reason"]
    assert stopper.state_dict() == {"best": stopper.best, "best_step": 2, "wait": 2}


@pytest.mark.parametrize(
    "length", [{"steps": 5, "eval_every": 2}, {"epochs": 3, "eval_every": 1}], ids=["steps", "epochs"]
)
def test_the_evaluation_after_the_last_step_stops_nothing(length):
    # lr 0: evaluations 1 (best) and 2 wait, 3 waits again and would stop, but it comes after the last step (the
    # final evaluation in steps mode, the last epoch's in epochs mode): the run trained its full length
    stopper = EarlyStopping(monitor="val/loss", mode="min", patience=2)
    summary = tiny_engine(callbacks=[stopper], lr=0.0, **length).fit()
    assert stopper.wait == 2 and summary["status"] == "completed" and summary["stop_reason"] == ""
    assert summary["steps"] == 5 if "steps" in length else summary["epochs"] == 3


def test_min_delta_and_state_round_trip():
    a = EarlyStopping("val/loss", patience=3, min_delta=0.1)
    a.best, a.best_step, a.wait = 1.0, 10, 1
    assert not a.improved(0.95) and a.improved(0.85) and not a.improved(float("nan"))
    b = EarlyStopping("val/loss", patience=3, min_delta=0.1)
    b.load_state_dict(a.state_dict())
    assert (b.best, b.best_step, b.wait) == (1.0, 10, 1)
    c = EarlyStopping("val/accuracy", mode="max", min_delta=0.1)
    c.best = 0.5
    assert not c.improved(0.55) and c.improved(0.65)


def test_unknown_monitor_names_the_available_metrics():
    with pytest.raises(EngineError, match=r"`val/acc`.*`val/loss`, `val/accuracy`"):
        tiny_engine(callbacks=[EarlyStopping("val/acc")], steps=2).fit()


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping("val/loss", mode="lower")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping("val/loss", patience=0)


@pytest.mark.parametrize(("monitor", "mode"), [("val/loss", "min"), ("val/word_error", "min"), ("val/accuracy", "max")])
def test_the_mode_follows_the_monitors_name_when_unset(monitor, mode):
    assert EarlyStopping(monitor=monitor).mode == mode
    assert EarlyStopping(monitor=monitor, mode="max" if mode == "min" else "min").mode != mode  # given: it wins


@pytest.mark.parametrize("monitor", ["val/score", "val/accuracy_error"])
def test_a_monitor_whose_name_says_no_direction_needs_the_mode(monitor):
    with pytest.raises(ValueError, match=rf"cannot tell whether a smaller or a larger `{monitor}` is better"):
        EarlyStopping(monitor=monitor)
    assert EarlyStopping(monitor=monitor, mode="max").mode == "max"
