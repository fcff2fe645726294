"""Trackers through Accelerate: TensorBoard by default, train and eval curves apart, run identity for resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from accelengine import Callback, CheckpointConfig, EngineError, LogConfig
from accelengine.callbacks import Trackers
from accelengine.recipe import validate

from .helpers import tiny_engine

pytest.importorskip("tensorboard")


def scalars(event_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_by_default_with_train_and_val_apart(tmp_path):
    engine = tiny_engine(out_dir=tmp_path)  # 2 epochs of 4 steps, log every 2, evaluate every epoch
    engine.fit()
    tracker = next(cb for cb in engine.callbacks if isinstance(cb, Trackers))
    assert tracker.runs == {"tensorboard": "trackers/accelengine"}  # relative to the run directory
    got = scalars(tmp_path / "trackers" / "accelengine")
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6, 8]
    assert [s for s, _ in got["val/accuracy"]] == [4, 8]
    assert [s for s, _ in got["val/loss"]] == [4, 8]
    assert [s for s, _ in got["train/lr"]] == [2, 4, 6, 8]
    assert got["val/accuracy"][-1][1] == pytest.approx(engine.state.last_eval["val/accuracy"])
    assert engine.summary()["trackers"] == {"tensorboard": "trackers/accelengine"}


def test_no_trackers_without_a_run_directory_or_when_switched_off(tmp_path):
    assert tiny_engine().accelerator.log_with == []
    engine = tiny_engine(out_dir=tmp_path, log=LogConfig(progress=False, trackers=[]))
    engine.fit()
    assert engine.accelerator.log_with == [] and not (tmp_path / "trackers").exists()


def test_state_dict_reopens_the_same_tensorboard_run(tmp_path):
    first = tiny_engine(out_dir=tmp_path / "a", steps=6, log_every=2, log=LogConfig(progress=False, project="p"))
    first.fit()  # train/loss at 2, 4, 6, val/* at 6
    saved = next(cb for cb in first.callbacks if isinstance(cb, Trackers)).state_dict()
    assert (saved["project"], saved["runs"]) == ("p", {"tensorboard": "trackers/p"})
    before = scalars(tmp_path / "a" / "trackers" / "p")

    # The run directory was moved (a copy resumed elsewhere): "resume" at step 6 there. Events go to the same
    # place inside it; step 6 is purged and what the first run logged there is logged again, once.
    (tmp_path / "a").rename(tmp_path / "b")
    second = tiny_engine(out_dir=tmp_path / "b", steps=8, log_every=2)  # project: from the saved state
    tracker = next(cb for cb in second.callbacks if isinstance(cb, Trackers))
    tracker.load_state_dict(saved)
    second.setup()
    second.state.step = 6  # as a resume from the step-6 checkpoint leaves it
    tracker.before_fit(second)
    second.state.step = 8
    second.log({"train/loss": 456.0})
    tracker.after_fit(second)
    assert (tracker.state_dict()["project"], tracker.state_dict()["runs"]) == (saved["project"], saved["runs"])
    got = scalars(tmp_path / "b" / "trackers" / "p")
    assert got["train/loss"] == [*before["train/loss"], (8, 456.0)]  # the first run's, then the resumed one
    assert got["val/accuracy"] == before["val/accuracy"]


def test_a_checkpoint_from_before_the_latest_records_were_kept_still_resumes(tmp_path):
    first = tiny_engine(out_dir=tmp_path, steps=6, log_every=2)
    first.fit()
    before = scalars(tmp_path / "trackers" / "accelengine")
    second = tiny_engine(out_dir=tmp_path, steps=8, log_every=2)
    tracker = next(cb for cb in second.callbacks if isinstance(cb, Trackers))
    tracker.load_state_dict({"project": "accelengine", "runs": {"tensorboard": "trackers/accelengine"}})
    second.setup()
    second.state.step = 6
    tracker.before_fit(second)
    tracker.after_fit(second)
    # nothing to log step 6 again from: it is kept as the first run logged it
    assert scalars(tmp_path / "trackers" / "accelengine") == before


class Crash(Callback):
    def after_fit_step(self, engine):
        if engine.state.step == 6:
            raise RuntimeError("simulated crash")


def _next_event_file_numbers_cross_a_power_of_ten() -> None:
    """Event files are numbered by a process-wide counter: the crashed run's file gets N-2 where N is a power of ten,
    the resumed run's N or more (`.98` then `.100`: by name, the later file sorts first)."""
    from tensorboard.summary.writer import event_file_writer

    counter = event_file_writer._global_uid  # the counter `events.out.tfevents.<s>.<host>.<pid>.<n>` takes n from
    n = counter.get()
    target = 10 ** len(str(n + 2)) - 2
    while n < target - 1:
        n = counter.get()


def test_a_resumed_run_continues_the_same_curves(tmp_path):
    _next_event_file_numbers_cross_a_power_of_ten()  # in one second, one process: the case names would misorder
    checkpoints = CheckpointConfig(every_steps=4, at_end=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_engine(callbacks=[Crash()], out_dir=tmp_path, steps=8, eval_every=4, checkpoint=checkpoints).fit()
    resumed = tiny_engine(
        out_dir=tmp_path,
        steps=8,
        eval_every=4,
        checkpoint=checkpoints,
        resume_from=tmp_path / "checkpoints" / "step-00000004",
    )
    resumed.fit()
    (tracker,) = [cb for cb in resumed.callbacks if isinstance(cb, Trackers)]
    got = scalars(tmp_path / tracker.runs["tensorboard"])
    # the crashed run logged train/loss at 2, 4, 6; the resume (from step 4) at 6, 8: step 6 appears once
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6, 8]
    assert [s for s, _ in got["val/accuracy"]] == [4, 8]


def test_a_resume_from_the_last_step_of_an_epoch_logs_its_evaluation_once(tmp_path):
    import json

    # Saved at step 4, the last step of the first epoch, before that epoch's evaluation: the crashed run logged the
    # evaluation (at step 4) after its checkpoint, and the resumed run evaluates that epoch's end again.
    checkpoints = CheckpointConfig(every_steps=4, at_end=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_engine(callbacks=[Crash()], out_dir=tmp_path, epochs=2, checkpoint=checkpoints).fit()
    resume_from = tmp_path / "checkpoints" / "step-00000004"
    tiny_engine(out_dir=tmp_path, epochs=2, checkpoint=checkpoints, resume_from=resume_from).fit()
    got = scalars(tmp_path / "trackers" / "accelengine")
    assert [s for s, _ in got["val/accuracy"]] == [4, 8]
    assert [s for s, _ in got["train/loss"]] == [2, 4, 6, 8]
    # every record of metrics.jsonl, once, with the same values
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for tag, points in got.items():
        expected = [(r["step"], r[tag]) for r in records if tag in r]
        assert [(s, pytest.approx(v)) for s, v in points] == expected


def test_a_fresh_start_over_a_run_that_died_before_its_first_checkpoint_replaces_its_curves(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_engine(callbacks=[Crash()], out_dir=tmp_path, steps=8).fit()  # logged at 2, 4, 6; no checkpoint
    again = tiny_engine(out_dir=tmp_path, steps=4, lr=0.0)  # no checkpoint to resume from: starts afresh
    again.fit()
    got = scalars(tmp_path / "trackers" / "accelengine")
    assert [s for s, _ in got["train/loss"]] == [2, 4]  # the dead attempt's curve is gone, as in metrics.jsonl
    assert got["train/loss"][-1][1] == pytest.approx(again.state.last_train["train/loss"])


def test_unknown_or_missing_trackers_are_refused(tmp_path):
    with pytest.raises(EngineError, match="unknown tracker `tensorbord`"):
        tiny_engine(out_dir=tmp_path, log=LogConfig(trackers=["tensorbord"]))
    if not _installed("aim"):
        with pytest.raises(EngineError, match=r"tracker `aim` is not installed.*pip install aim"):
            tiny_engine(out_dir=tmp_path, log=LogConfig(trackers=["aim"]))


def test_recipe_log_section_is_validated():
    base = {
        "model": {"_component_": "mlp", "in_features": 8, "out_features": 3},
        "loss": "cross_entropy",
        "optim": "sgd",
        "data": {"train": {"dataset": "synthetic_classification"}},
        "trainer": {"epochs": 1},
    }
    recipe = validate({**base, "log": {"trackers": ["tensorboard"], "tracker_kwargs": {"tensorboard": {"a": [1]}}}})
    assert recipe.log.trackers == ["tensorboard"] and recipe.log.tracker_kwargs == {"tensorboard": {"a": [1]}}
    from accelengine import RecipeError

    with pytest.raises(RecipeError, match=r"log.trackers\[0\].*unknown tracker `wandbb`"):
        validate({**base, "log": {"trackers": ["wandbb"]}})
    with pytest.raises(RecipeError, match=r"log\.progres"):
        validate({**base, "log": {"progres": False}})


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_a_new_event_file_waits_for_a_name_that_sorts_after_the_earlier_ones(tmp_path):
    import time

    from accelengine.callbacks.trackers import _after_earlier_event_files

    now = int(time.time())
    (tmp_path / f"events.out.tfevents.{now}.host.1.9").touch()
    _after_earlier_event_files(tmp_path)
    assert int(time.time()) > now  # a name stamped now sorts after `.9` whatever its counter
    (tmp_path / f"events.out.tfevents.{now + 3600}.host.1.9").touch()  # another machine's clock, an hour ahead
    start = time.monotonic()
    _after_earlier_event_files(tmp_path)
    assert time.monotonic() - start < 0.5  # waiting would not help: it does not
