"""The step loop: hook order, losses, lengths, evaluation-only runs, the Python API."""

from __future__ import annotations

import math

import pytest
import torch

from accelengine import HOOKS, Callback, Engine, EngineError, TrainerConfig


class Recorder(Callback):
    """Records every hook call (and every log record) in order."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[str] = []
        self.records: list[dict] = []

    def on_log(self, engine, record):
        self.records.append(record)


for _hook in HOOKS:
    setattr(Recorder, _hook, lambda self, engine, _h=_hook: self.calls.append(_h))


def expected_order(batches_per_epoch, epochs, eval_batches, eval_every=1, sets=1, steps=None):
    """The documented order, written out independently of the engine."""
    evaluation = ["before_eval"] + ["before_eval_step", "eval_step", "after_eval_step"] * eval_batches * sets
    evaluation += ["after_eval"]
    out = ["before_fit", "before_task"]
    step = 0
    for epoch in range(1, epochs + 1):
        out.append("before_fit_epoch")
        for _ in range(batches_per_epoch):
            out += ["before_fit_step", "before_optimizer_step", "fit_step"]
            step += 1
            if steps is not None and step % eval_every == 0:
                out += evaluation
            out.append("after_fit_step")
            if steps is not None and step == steps:
                if step % eval_every:
                    out += evaluation
                return [*out, "after_task", "after_fit"]
        if steps is None and epoch % eval_every == 0:
            out += evaluation
        out.append("after_fit_epoch")
    if steps is None and epochs % eval_every:
        out += evaluation
    return [*out, "after_task", "after_fit"]


def test_hook_order_epochs(make_engine):
    rec = Recorder()
    make_engine(callbacks=[rec]).fit()  # 96 samples / 16 = 6 batches, val 40 / 16 = 3 batches
    assert rec.calls == expected_order(6, 2, 3)


def test_hook_order_steps_and_cadence(make_engine):
    rec = Recorder()
    engine = make_engine(callbacks=[rec], config=TrainerConfig(steps=8, eval_every=3, device="cpu"))
    summary = engine.fit()
    assert summary["steps"] == 8 and summary["epochs"] == 1  # 6 batches per epoch: stopped mid-epoch 2
    assert rec.calls == expected_order(6, 2, 3, eval_every=3, steps=8)


def test_hook_order_eval_only(make_engine, tiny_data):
    rec = Recorder()
    engine = make_engine(data={"val": tiny_data["val"], "test": tiny_data["val"]}, callbacks=[rec], optimizer=None)
    summary = engine.fit()
    evaluation = ["before_eval"] + ["before_eval_step", "eval_step", "after_eval_step"] * 6 + ["after_eval"]
    assert rec.calls == ["before_fit", *evaluation, "after_fit"]
    assert summary["steps"] == 0 and set(summary["final"]) == {"val/loss", "val/accuracy", "test/loss", "test/accuracy"}


def test_subclass_hooks_run_before_callbacks(make_engine):
    order = []

    class Mine(Engine):
        def before_fit_epoch(self):
            order.append("engine")

    class Cb(Callback):
        def before_fit_epoch(self, engine):
            order.append("callback")

    make_engine(Mine, callbacks=[Cb()]).fit()
    assert order == ["engine", "callback"] * 2


def test_idle_hooks_are_never_called(make_engine):
    """A callback that declares a hook idle for this run is not dispatched it; its other hooks still run."""
    rec = Recorder()
    rec.idle_hooks = lambda engine: ("after_fit_step", "before_fit_step")
    make_engine(callbacks=[rec]).fit()
    assert "after_fit_step" not in rec.calls and "before_fit_step" not in rec.calls
    assert rec.calls.count("fit_step") == 12 and rec.calls.count("before_optimizer_step") == 12


def test_step_hooks_without_handlers_cost_one_no_op(make_engine):
    """Hooks nobody implements are bound to one shared no-op; without accumulation, `fit_step` is the micro-batch
    itself."""
    engine = make_engine()
    engine.callbacks = []
    engine.setup()
    assert engine._hooks["before_fit_step"] is engine._hooks["after_fit_step"]
    assert engine._hooks["fit_step"] == engine._micro_batch


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_multi_term_loss_logged_and_summed(make_engine, kind):
    seen = []

    class TwoTerms(Engine):
        def compute_loss(self, batch):
            x, y = batch
            logits = self.model(x)
            ce = torch.nn.functional.cross_entropy(logits, y)
            reg = 0.01 * logits.pow(2).mean()
            seen.append((ce.detach() + reg.detach()).item())
            return {"ce": ce, "reg": reg} if kind == "dict" else [ce, reg]

    rec = Recorder()
    engine = make_engine(TwoTerms, callbacks=[rec], config=TrainerConfig(steps=4, log_every=2, device="cpu"))
    engine.fit()
    names = ("ce", "reg") if kind == "dict" else ("loss_0", "loss_1")
    train = [r for r in rec.records if "train/loss" in r]
    assert len(train) == 2 and all(f"train/{n}" in r for r in train for n in names)
    first = train[0]
    assert first["train/loss"] == pytest.approx(sum(seen[:2]) / 2, rel=1e-5)
    assert first["train/loss"] == pytest.approx(first[f"train/{names[0]}"] + first[f"train/{names[1]}"], rel=1e-5)


def test_a_dict_holding_only_loss_logs_it_alone(make_engine):
    class Named(Engine):
        def compute_loss(self, batch):
            return {"loss": super().compute_loss(batch)}

    rec = Recorder()
    make_engine(Named, callbacks=[rec], config=TrainerConfig(steps=2, log_every=2, device="cpu")).fit()
    (train,) = [r for r in rec.records if "train/loss" in r]
    assert sorted(k for k in train if k.startswith("train/")) == ["train/loss", "train/lr"]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({}, "returned no loss terms"),
        ([], "returned no loss terms"),
        (1.5, "must return a tensor, a list or a dict"),
        ({"loss": torch.ones((), requires_grad=True), "reg": torch.ones(())}, "a term named `loss` beside `reg`"),
    ],
)
def test_compute_loss_returning_no_terms_or_a_wrong_type_is_a_clear_error(make_engine, returned, message):
    class Wrong(Engine):
        def compute_loss(self, batch):
            return returned

    engine = make_engine(Wrong, config=TrainerConfig(steps=2, device="cpu"))
    with pytest.raises(EngineError, match=message):
        engine.fit()
    assert engine.state.step == 0 and engine.state.status == "failed"


def test_a_failing_after_fit_handler_does_not_cost_the_others_and_the_summary_says_failed(tmp_path, make_engine):
    import json

    class FullDisk(Callback):  # a user callback: it runs before the checkpointer's end-of-run save and the summary
        def after_fit(self, engine):
            raise OSError(28, "No space left on device")

    out = tmp_path / "run"
    engine = make_engine(callbacks=[FullDisk()], out_dir=out, config=TrainerConfig(steps=2, device="cpu"))
    with pytest.raises(OSError, match="No space left on device"):
        engine.fit()
    assert (out / "checkpoints" / "step-00000002" / "manifest.json").is_file()  # the save after it still ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["stop_reason"], summary


def test_gradient_accumulation_counts_optimizer_steps(make_engine):
    engine = make_engine(config=TrainerConfig(epochs=2, grad_accum=4, device="cpu"))
    summary = engine.fit()
    assert engine.accelerator.gradient_accumulation_steps == 4
    assert summary["steps"] == 2 * math.ceil(6 / 4)  # the last partial accumulation of an epoch still steps


def test_scheduler_steps_once_per_optimizer_step(make_engine):
    from accelengine.schedules import linear

    engine = make_engine(
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
        scheduler=lambda opt, total_steps: linear(opt, total_steps=total_steps),
        config=TrainerConfig(epochs=1, grad_accum=2, device="cpu"),
    )
    engine.fit()
    assert engine.total_steps == 3
    assert engine.scheduler.last_epoch == 3
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_training_learns_and_reports_final_metrics(make_engine):
    summary = make_engine(config=TrainerConfig(epochs=6, device="cpu")).fit()
    assert summary["status"] == "completed"
    assert summary["final"]["val/accuracy"] >= 0.9


def test_loss_values_are_read_only_at_log_steps(make_engine):
    rec = Recorder()
    make_engine(callbacks=[rec], config=TrainerConfig(steps=9, log_every=3, device="cpu")).fit()
    assert [r["step"] for r in rec.records if "train/loss" in r] == [3, 6, 9]


def test_request_stop_ends_training(make_engine):
    class StopAt(Callback):
        def after_fit_step(self, engine):
            if engine.state.step == 5:
                engine.state.request_stop("enough")

    summary = make_engine(callbacks=[StopAt()], config=TrainerConfig(epochs=5, device="cpu")).fit()
    assert summary["status"] == "stopped" and summary["steps"] == 5 and summary["stop_reason"] == "enough"


def test_every_n_steps_cadence(make_engine):
    seen = []

    class Every3(Callback):
        def after_fit_step(self, engine):
            seen.append(engine.state.step)

    make_engine(callbacks=[Every3(every_n_steps=3)], config=TrainerConfig(steps=10, device="cpu")).fit()
    assert seen == [3, 6, 9]


def test_failed_run_reports_failed(make_engine):
    class Broken(Engine):
        def compute_loss(self, batch):
            raise ValueError("boom")

    engine = make_engine(Broken)
    with pytest.raises(ValueError, match="boom"):
        engine.fit()
    assert engine.state.status == "failed" and "boom" in engine.state.stop_reason


def test_missing_length_and_optimizer_are_clear_errors(make_engine):
    with pytest.raises(EngineError, match="optimizer"):
        make_engine(optimizer=None).fit()
    with pytest.raises(EngineError, match="epochs"):
        make_engine(config=TrainerConfig(device="cpu")).fit()


def test_missing_loss_is_a_clear_error_before_any_step(make_engine):
    rec = Recorder()
    engine = make_engine(loss=None, callbacks=[rec])
    with pytest.raises(EngineError, match=r"no loss.*compute_loss"):
        engine.fit()
    assert engine.state.step == 0 and "before_fit" not in rec.calls

    class OwnLoss(Engine):  # a subclass that computes its loss itself needs no `loss`
        def compute_loss(self, batch):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

    assert make_engine(OwnLoss, loss=None).fit()["status"] == "completed"


@pytest.mark.parametrize("handlers", [1, 2, 3, 4])
def test_every_handler_of_a_hook_runs_once_in_order(make_engine, handlers):
    """However many callbacks implement a hook (the dispatcher is unrolled for one or two), each runs once per
    call, in registration order, after the engine's own method."""
    calls = []

    class Tagged(Callback):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def after_fit_step(self, engine):
            calls.append((engine.state.step, self.tag))

        def fit_step(self, engine):
            calls.append((engine.state.step, f"fit{self.tag}"))

    class Mine(Engine):
        def after_fit_step(self):
            calls.append((self.state.step, "engine"))

    make_engine(Mine, callbacks=[Tagged(i) for i in range(handlers)], config=TrainerConfig(steps=3, device="cpu")).fit()
    tags = list(range(handlers))
    per_step = [f"fit{t}" for t in tags] + ["engine"] + tags
    assert calls == [(step, tag) for step in (1, 2, 3) for tag in per_step]


def test_dict_batches_use_configured_keys(make_engine, tiny_data):
    from torch.utils.data import Dataset

    class Dicts(Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            x, y = self.base[i]
            return {"input": x, "label": y}

    data = {k: Dicts(v) for k, v in tiny_data.items()}
    summary = make_engine(data=data).fit()
    assert summary["status"] == "completed" and "val/accuracy" in summary["final"]


def test_seeded_runs_are_identical(make_engine):
    a = make_engine().fit()
    b = make_engine().fit()
    assert a["final"] == b["final"] and a["last_train"] == b["last_train"]


def test_host_losses_and_device_read_back_log_the_same_records(make_engine):
    """One CPU process reads each loss as a float when it is made; elsewhere the losses are stacked on the device at
    a log step and read back in one go. Both give the same records (losses and a monitor's device value alike)."""
    from accelengine.callbacks import GradNormMonitor

    def records(read_on_host):
        rec = Recorder()
        engine = make_engine(
            callbacks=[GradNormMonitor(), rec], config=TrainerConfig(steps=7, log_every=3, device="cpu")
        )
        engine.setup()
        assert engine.losses_on_host  # what a one-process CPU run uses
        engine._read_losses_on_host(read_on_host)
        engine.fit()
        return [r for r in rec.records if "train/loss" in r]

    host, device = records(True), records(False)
    assert [r["step"] for r in host] == [3, 6, 7] and [set(r) for r in host] == [set(r) for r in device]
    for a, b in zip(host, device, strict=True):
        assert a == pytest.approx(b, rel=1e-6)
    assert {"train/loss", "train/grad_norm", "train/lr"} <= set(host[0])


@pytest.mark.parametrize("on_host", [True, False])
def test_loss_value_is_the_float_of_the_loss_on_the_host_only(make_engine, on_host):
    seen = []

    class Reads(Callback):
        def before_optimizer_step(self, engine):
            seen.append((engine.state.loss_value, engine.state.loss.item(), engine.state.loss.requires_grad))

    engine = make_engine(callbacks=[Reads()], config=TrainerConfig(steps=3, device="cpu"))
    engine.setup()
    engine._read_losses_on_host(on_host)
    engine.fit()
    assert len(seen) == 3 and not any(attached for _, _, attached in seen)
    assert all((value == loss) if on_host else value is None for value, loss, _ in seen)


def test_overridden_fit_step_runs_and_trains_like_the_direct_binding(make_engine):
    """Without accumulation the engine binds `fit_step` to the micro-batch itself; a subclass that overrides
    `fit_step` is called instead, every step, and (calling super) trains exactly alike."""
    calls = []

    class Counting(Engine):
        def fit_step(self, batch):
            calls.append(self.state.step)
            super().fit_step(batch)

    direct, counted = make_engine(), make_engine(Counting)
    direct.fit()
    counted.fit()
    assert calls == list(range(12))  # 2 epochs x 6 batches, before each step's optimizer step
    for a, b in zip(direct.model.parameters(), counted.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bound_default_loss_trains_like_compute_loss_and_overrides_are_called(make_engine):
    """Without overrides the engine computes the default loss through a function bound at setup (no
    `compute_loss`/`split_batch` call per step); it trains exactly as `compute_loss` does, and a subclass that
    overrides `compute_loss` or `split_batch` is called on every step instead."""
    calls = {"compute_loss": 0, "split_batch": 0}

    class Computes(Engine):
        def compute_loss(self, batch):
            calls["compute_loss"] += 1
            return super().compute_loss(batch)

    class Splits(Engine):
        def split_batch(self, batch):
            calls["split_batch"] += self.model.training  # evaluation splits its batches too: not counted
            return super().split_batch(batch)

    bound, computes, splits = make_engine(), make_engine(Computes), make_engine(Splits)
    for engine in (bound, computes, splits):
        engine.fit()
    assert calls == {"compute_loss": 12, "split_batch": 12}  # 2 epochs x 6 batches
    for other in (computes, splits):
        for a, b in zip(bound.model.parameters(), other.model.parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_hook_replaced_on_the_instance_is_the_one_called(make_engine):
    """Handlers are bound once; a hook a callback's instance replaces (a wrapper that times it, say) is what runs."""
    calls = []

    class Cb(Callback):
        def after_fit_step(self, engine):
            calls.append("class")

    cb = Cb()
    original = cb.after_fit_step
    cb.after_fit_step = lambda engine: (calls.append("instance"), original(engine))
    make_engine(callbacks=[cb], config=TrainerConfig(steps=2, device="cpu")).fit()
    assert calls == ["instance", "class"] * 2


def test_a_metric_named_loss_takes_the_evaluated_losss_place():
    # trained with cross-entropy, evaluated with a label-smoothed one: `val/loss` is the metric's, reported once
    from accelengine import MLP
    from accelengine.examples.synthetic import classification
    from accelengine.metrics import Accuracy, MeanLoss

    def evaluate(metrics):
        torch.manual_seed(0)
        engine = Engine(
            model=MLP(8, 3, hidden=[16]),
            data={"val": classification(samples=32, features=8, classes=3, seed=1)},
            loss=torch.nn.CrossEntropyLoss(),
            metrics=metrics,
            config=TrainerConfig(device="cpu"),
        )
        return engine.evaluate()

    plain = evaluate({"accuracy": Accuracy()})
    smoothed = evaluate({"loss": MeanLoss(torch.nn.CrossEntropyLoss(label_smoothing=0.5)), "accuracy": Accuracy()})
    assert set(plain) == set(smoothed) == {"val/loss", "val/accuracy"}
    assert smoothed["val/accuracy"] == plain["val/accuracy"] and smoothed["val/loss"] != plain["val/loss"]
