"""The default callback set: its members and order, switches, replacement, and no host-device sync per step."""

from __future__ import annotations

import collections

import torch

from accelengine import Callback, LogConfig
from accelengine.callbacks import (
    ConsoleLogger,
    MetricsWriter,
    NanGuard,
    ParamTable,
    ProgressBar,
    RunFiles,
    RunSummary,
    Trackers,
)

from .helpers import tiny_engine


def kinds(engine):
    return [type(cb).__name__ for cb in engine.callbacks]


class Mine(Callback):
    pass


def test_default_set_and_order(tmp_path):
    engine = tiny_engine(callbacks=[Mine()], out_dir=tmp_path, log=LogConfig())
    names = kinds(engine)
    first = ["RunFiles", "NanGuard", "ParamTable", "MetricsWriter", "ProgressBar", "ConsoleLogger", "Trackers"]
    assert names[: len(first)] == first
    assert names.index("Mine") > len(first) - 1  # user callbacks after the built-ins
    assert names[-1] == "RunSummary"  # last: summary.json holds what everyone added
    nan_guard = engine.callbacks[1]
    assert isinstance(nan_guard, NanGuard) and nan_guard.mode == "stop"


def test_switches():
    engine = tiny_engine(log=LogConfig(progress=False, console=False, param_table=False, nan_guard="off"))
    assert not any(isinstance(cb, (ProgressBar, ConsoleLogger, ParamTable, NanGuard)) for cb in engine.callbacks)
    assert all(any(isinstance(cb, k) for cb in engine.callbacks) for k in (RunFiles, MetricsWriter, Trackers))
    assert isinstance(engine.callbacks[-1], RunSummary)


def test_a_given_builtin_takes_its_place():
    bar, guard = ProgressBar(metric="val/loss"), NanGuard(mode="skip")
    engine = tiny_engine(callbacks=[guard, bar], log=LogConfig())
    assert engine.callbacks.index(bar) < next(
        i for i, cb in enumerate(engine.callbacks) if isinstance(cb, ConsoleLogger)
    )
    assert [cb for cb in engine.callbacks if isinstance(cb, (ProgressBar, NanGuard))] == [guard, bar]


def test_a_second_instance_of_a_builtin_runs_where_it_was_given():
    first, second = ProgressBar(metric="val/loss"), ProgressBar(metric="val/accuracy")
    engine = tiny_engine(callbacks=[first, Mine(), second], log=LogConfig())
    bars = [cb for cb in engine.callbacks if isinstance(cb, ProgressBar)]
    assert bars == [first, second]
    assert engine.callbacks.index(second) > [type(cb) for cb in engine.callbacks].index(Mine)


def test_summary_extras_from_any_callback_reach_summary_json(tmp_path):
    import json

    class Adds(Callback):
        def after_fit(self, engine):
            engine.summary_extras["mine"] = {"late": True}

    engine = tiny_engine(callbacks=[Adds()], out_dir=tmp_path, steps=2)
    engine.fit()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mine"] == {"late": True}
    assert summary["params"]["trainable"] == sum(p.numel() for p in engine.unwrapped_model().parameters())
    assert summary["best"]["metric"] == "val/accuracy" and summary["best"]["step"] in (1, 2)


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy")


def count_syncs(monkeypatch, engine) -> int:
    """Python-level reads of tensors back to the host during `fit` (each one a sync on an accelerator)."""
    counts = collections.Counter()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    engine.fit()
    monkeypatch.undo()
    return sum(counts.values())


def test_the_default_set_adds_no_sync_per_step(monkeypatch):
    def engine(steps, builtins=True):
        # batches of 4: 16 steps per epoch, so these runs stay within one epoch; a single log step at the end
        e = tiny_engine(steps=steps, log_every=steps, eval_every=10**6, batch_size=4, log=LogConfig(progress_every_s=0))
        if not builtins:
            e.callbacks = []
        e.setup()
        # as on an accelerator: the losses stay on the device between log steps (one CPU process instead reads
        # each one as a float when it is made, which is no synchronisation there)
        e._read_losses_on_host(False)
        e._bind_hooks()  # as setup does once it has chosen: the NaN guard's device path has a per-step hook
        return e

    with_defaults = [count_syncs(monkeypatch, engine(n)) for n in (4, 12)]
    without = [count_syncs(monkeypatch, engine(n, builtins=False)) for n in (4, 12)]
    assert with_defaults[1] - with_defaults[0] == without[1] - without[0]
