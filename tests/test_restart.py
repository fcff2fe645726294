"""Exact restart: a run interrupted and resumed equals an uninterrupted one, bit for bit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from accelengine import MLP, Accuracy, Callback, CheckpointConfig, DataConfig, Engine, EngineError, TrainerConfig
from accelengine.checkpoint import find_latest, list_checkpoints, read_checkpoint
from accelengine.examples.synthetic import classification
from accelengine.restart import plan_resume


class Crash(Exception):
    pass


class CrashAt(Callback):
    """Dies (like a killed process, without a final checkpoint) once `step` optimizer steps are done."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def after_fit_step(self, engine):
        if engine.state.step >= self.step:
            raise Crash()


def build(
    out_dir,
    *,
    steps=None,
    epochs=None,
    grad_accum=None,
    every_steps=4,
    callbacks=(),
    resume=None,
    dropout=0.1,
    train_set=None,
    eval_every=None,
    checkpoint=None,
):
    torch.manual_seed(123)  # the model's initial weights; the engine seeds everything else itself
    data = {
        "train": train_set if train_set is not None else classification(samples=90, features=8, classes=3),
        "val": classification(samples=30, features=8, classes=3, seed=1),
    }
    return Engine(
        model=MLP(8, 3, hidden=[16], dropout=dropout),  # dropout: the resumed RNG must be exact too
        data=data,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
        scheduler=lambda opt, total_steps: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7),
        metrics={"accuracy": Accuracy()},
        callbacks=list(callbacks),
        config=TrainerConfig(
            steps=steps,
            epochs=epochs,
            grad_accum=grad_accum,
            log_every=3,
            eval_every=eval_every or (2 if steps else 1),
            device="cpu",
        ),
        data_config=DataConfig(batch_size=8),
        checkpoint_config=checkpoint or CheckpointConfig(every_steps=every_steps, keep_last=2),
        seed=7,
        out_dir=out_dir,
        resume_from=resume,
    )


def weights_and_optimizer(engine):
    model = {k: v.clone() for k, v in engine.unwrapped_model().state_dict().items()}
    opt = engine.optimizer.state_dict()["state"]
    return model, {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in opt.items()}


def logged(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    keep = ("train/loss", "train/lr", "val/loss", "val/accuracy")
    return [{k: r[k] for k in ("step", "epoch", *keep) if k in r} for r in records if any(k in r for k in keep)]


def assert_identical(a, b):
    (ma, oa), (mb, ob) = weights_and_optimizer(a), weights_and_optimizer(b)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert oa.keys() == ob.keys()
    for k in oa:
        for n in oa[k]:
            assert torch.equal(torch.as_tensor(oa[k][n]), torch.as_tensor(ob[k][n])), (k, n)


def interrupted_then_resumed(tmp_path, crash_step, **kw):
    out = tmp_path / "resumed"
    with pytest.raises(Crash):
        build(out, callbacks=[CrashAt(crash_step)], **kw).fit()
    latest = find_latest(out / "checkpoints")
    assert latest is not None
    engine = build(out, resume=plan_resume(out, "auto"), **kw)
    engine.fit()
    return engine, out


@pytest.mark.parametrize(
    "case",
    [
        dict(steps=30, crash_step=10),  # mid-epoch (12 batches per epoch), checkpoint at 8
        dict(steps=30, crash_step=13, every_steps=12),  # exactly at an epoch boundary
        dict(epochs=4, crash_step=20),  # epochs mode
        dict(steps=12, crash_step=7, grad_accum=5),  # accumulation: 12 batches = steps at batches 5, 10 and 12
    ],
    ids=["mid-epoch", "epoch-boundary", "epochs-mode", "grad-accum"],
)
def test_resume_is_bit_exact(tmp_path, case):
    crash = case.pop("crash_step")
    straight = build(tmp_path / "straight", **case)
    straight.fit()
    resumed, out = interrupted_then_resumed(tmp_path, crash, **case)
    assert resumed.state.step == straight.state.step
    assert_identical(straight, resumed)
    assert logged(out) == logged(tmp_path / "straight")  # every record once, same values
    assert json.loads((out / "summary.json").read_text())["final"] == straight.state.last_eval


class Samples(torch.utils.data.Dataset):
    """The training set of `build`, read a sample at a time (subclasses change what a read does)."""

    def __init__(self):
        self.base = classification(samples=90, features=8, classes=3)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


class Augmented(Samples):
    """Random augmentation drawn, sample by sample, from torch's, numpy's and python's global generators."""

    def __getitem__(self, i):
        x, y = self.base[i]
        noise = np.random.normal(size=x.shape).astype("float32") * 0.1 + random.random() * 0.01
        return x + torch.from_numpy(noise) + 0.1 * torch.randn(x.shape), y


@pytest.mark.parametrize("crash_step", [10, 13], ids=["mid-epoch", "epoch-boundary"])
def test_resume_with_random_augmentation_is_bit_exact(tmp_path, crash_step):
    """The batches after a resume draw their augmentation from the generators as they were at the checkpoint,
    not from the epoch's start (which only the loader's own seeds come from)."""
    straight = build(tmp_path / "straight", steps=30, every_steps=4, train_set=Augmented())
    straight.fit()
    resumed, out = interrupted_then_resumed(tmp_path, crash_step, steps=30, every_steps=4, train_set=Augmented())
    assert_identical(straight, resumed)
    assert logged(out) == logged(tmp_path / "straight")


def test_resume_skips_by_index_not_by_loading(tmp_path):
    """Resuming mid-epoch must not fetch the skipped batches."""
    fetched = []

    class Counting(Samples):
        def __getitem__(self, i):
            fetched.append(i)
            return super().__getitem__(i)

    out = tmp_path / "run"
    with pytest.raises(Crash):
        build(out, steps=10, callbacks=[CrashAt(9)]).fit()
    engine = build(out, steps=10, resume=plan_resume(out, "auto"))
    engine.loaders["train"] = Counting()
    engine.setup()
    fetched.clear()
    engine.fit()
    # checkpoint at step 8 of 12 per epoch: the 8 skipped batches (64 samples) are never fetched, only the 2
    # remaining ones (one CPU process: the engine iterates its own loader, which reads nothing ahead)
    assert len(fetched) == 2 * 8


def test_no_checkpoint_means_fresh_start_with_rewound_log(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        build(out, steps=12, every_steps=None, callbacks=[CrashAt(5)]).fit()
    assert find_latest(out / "checkpoints") is None and (out / "metrics.jsonl").read_text()
    assert plan_resume(out, "auto") is None
    build(out, steps=12).fit()
    build(tmp_path / "straight", steps=12).fit()
    assert logged(out) == logged(tmp_path / "straight")


def test_resume_never_refuses_a_non_empty_directory(tmp_path):
    build(tmp_path / "run", steps=2).fit()
    with pytest.raises(EngineError, match="--resume never"):
        plan_resume(tmp_path / "run", "never")


def test_finished_run_without_checkpoint_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    engine = build(out, steps=2, every_steps=None)
    engine.checkpoint_config.at_end = False
    engine.fit()
    with pytest.raises(EngineError, match="finished run"):
        plan_resume(out, "auto")


def test_changed_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    engine = build(out, steps=4)
    engine.recipe = {"model": {"_component_": "mlp", "hidden": [16]}, "seed": 7}
    engine.fit()
    other = build(out, steps=8, resume=plan_resume(out, "auto"))
    other.recipe = {"model": {"_component_": "mlp", "hidden": [32]}, "seed": 7}
    with pytest.raises(EngineError, match="model"):
        other.fit()
    longer = build(out, steps=8, resume=plan_resume(out, "auto"))  # more steps is a change a resume can follow
    longer.recipe = {"model": {"_component_": "mlp", "hidden": [16]}, "seed": 7}
    assert longer.fit()["steps"] == 8


def test_model_shape_mismatch_is_refused(tmp_path):
    out = tmp_path / "run"
    build(out, steps=4).fit()
    engine = build(out, steps=8, resume=find_latest(out / "checkpoints"))
    engine.model = MLP(8, 3, hidden=[32])
    with pytest.raises(EngineError, match="does not fit"):
        engine.fit()


def test_init_from_checkpoint_or_safetensors(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "run"
    trained = build(out, steps=6)
    trained.fit()
    weights = {k: v.clone() for k, v in trained.unwrapped_model().state_dict().items()}
    ckpt = find_latest(out / "checkpoints")
    save_file(weights, tmp_path / "w.safetensors")
    for source in (ckpt, tmp_path / "w.safetensors", out):
        engine = build(None, steps=1)
        engine.checkpoint_config.init_from = str(source)
        engine.setup()
        got = engine.unwrapped_model().state_dict()
        assert all(torch.equal(got[k], weights[k]) for k in weights)
        assert not engine.optimizer.state_dict()["state"]  # a fresh optimizer


def test_checkpoint_contents(tmp_path):
    out = tmp_path / "run"
    build(out, steps=8).fit()
    ckpt = read_checkpoint(find_latest(out / "checkpoints"))
    assert {"model", "optimizer", "scheduler", "engine", "callbacks", "rng", "losses"} <= set(ckpt.parts)
    assert ckpt.meta["step"] == 8 and ckpt.meta["world_size"] == 1 and "versions" in ckpt.meta
    assert {p.suffix for p in ckpt.path.iterdir()} <= {".json", ".safetensors"}
    # keep_last=2: two cadence checkpoints remain (4 and 8; 8 is also the end)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-00000004", "step-00000008"]


def test_damaged_checkpoint_is_named_and_auto_falls_back(tmp_path):
    from .conftest import run_cli

    out = tmp_path / "run"
    build(out, steps=8).fit()  # checkpoints at 4 and 8
    newest = find_latest(out / "checkpoints")
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    assert plan_resume(out, "auto").name == "step-00000004"
    with pytest.raises(EngineError, match=r"model\.safetensors"):
        plan_resume(out, str(newest))
    for args in (("inspect", str(newest)), ("export", str(newest), "--out", str(tmp_path / "w.safetensors"))):
        res = run_cli(*args)
        assert res.returncode == 2 and "model.safetensors" in res.stderr and "Traceback" not in res.stderr


def test_pickle_payload_in_checkpoint_is_never_unpickled(tmp_path):
    import pickle

    out = tmp_path / "run"
    build(out, steps=4).fit()
    ckpt = find_latest(out / "checkpoints")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("optimizer.bin", "random_states_0.pkl", "model.pt"):
        (ckpt / name).write_bytes(pickle.dumps(Payload()))
    engine = build(out, steps=8, resume=plan_resume(out, "auto"))
    engine.fit()
    assert not marker.exists() and engine.state.step == 8


@pytest.mark.parametrize("part", ["losses", "engine", "optimizer"])
def test_a_part_that_does_not_fit_is_named_not_loaded(tmp_path, part):
    """A checksum-valid checkpoint whose contents do not fit this run (another version wrote it) is refused with
    an error naming the checkpoint and the part, not a traceback from deep inside a `load_state_dict`."""
    from accelengine.checkpoint import CheckpointManager

    out = tmp_path / "run"
    build(out, steps=4).fit()
    saved = read_checkpoint(find_latest(out / "checkpoints"))
    parts = dict(saved.parts)
    if part == "losses":
        parts["losses"] = dict(parts["losses"], micro_batches=parts["losses"]["micro_batches"] + 1)
    elif part == "engine":
        parts["engine"] = {k: v for k, v in parts["engine"].items() if k != "accumulation_counter"}
    else:
        parts["optimizer"] = dict(parts["optimizer"], param_groups=[])
    per_rank = {k: parts.pop(k) for k in ("rng", "losses")}
    bad = CheckpointManager(tmp_path / "edited").save("step-00000004", shared=parts, per_rank=per_rank, meta=saved.meta)
    engine = build(tmp_path / "resumed", steps=8, resume=bad)
    with pytest.raises(EngineError, match=rf"{bad}: its `{part}` state does not fit this run"):
        engine.fit()


def evaluations(out_dir) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in logged(out_dir) if "val/loss" in r}


@pytest.mark.parametrize("mode", ["max", "min", None])  # None: `val/loss` says min (an unset mode once meant max)
def test_keep_best_ranks_only_checkpoints_whose_own_weights_were_evaluated(tmp_path, mode):
    # saves every 2 steps, evaluations every 4: the saves at steps 2 and 6 hold no evaluation of their own
    checkpoint = CheckpointConfig(every_steps=2, keep_last=1, keep_best=1, monitor="val/loss", mode=mode, at_end=False)
    build(tmp_path, steps=8, eval_every=4, checkpoint=checkpoint).fit()
    values = evaluations(tmp_path)
    assert sorted(values) == [4, 8] and values[4] != values[8]
    best = (max if mode == "max" else min)(values, key=values.get)
    kept = {e.name: e.metric for e in list_checkpoints(tmp_path / "checkpoints")}
    assert f"step-{best:08d}" in kept and "step-00000008" in kept  # the best and the latest
    for name, metric in kept.items():  # a ranked value is the evaluation of that very step
        assert metric == values[int(name.split("-")[1])]


def test_the_final_checkpoint_holds_the_final_evaluation(tmp_path):
    # the last step is a periodic save (every 3); the final evaluation runs after it (evaluations every 4 steps)
    checkpoint = CheckpointConfig(every_steps=3, keep_last=1, keep_best=1, monitor="val/loss", mode="min")
    engine = build(tmp_path, steps=6, eval_every=4, checkpoint=checkpoint)
    summary = engine.fit()
    final = read_checkpoint(find_latest(tmp_path / "checkpoints"))
    assert final.path.name == "step-00000006"
    assert final.meta["metrics"] == summary["final"] == engine.state.last_eval
    assert final.parts["engine"]["last_eval_step"] == 6
    values = evaluations(tmp_path)
    assert final.parts["callbacks"]["checkpointer"]["best"] == min(values.values())
    assert {e.name: e.metric for e in list_checkpoints(tmp_path / "checkpoints")}["step-00000006"] == values[6]


def test_a_time_limit_stop_is_resumed_by_a_re_run_and_an_early_stop_is_not(tmp_path):
    import time

    from accelengine.callbacks import EarlyStopping, TimeLimit

    class Slow(Callback):
        def after_fit_step(self, engine):
            time.sleep(0.03)

    at_end = CheckpointConfig(every_steps=None, at_end=True, keep_last=2)
    first = build(tmp_path, steps=40, checkpoint=at_end, callbacks=[TimeLimit(0.2), Slow()]).fit()
    assert first["status"] == "stopped" and 0 < first["steps"] < 40
    again = build(tmp_path, steps=40, checkpoint=at_end, callbacks=[Slow()], resume=plan_resume(tmp_path, "auto")).fit()
    assert again["status"] == "completed" and again["steps"] == 40  # trained on from where the limit stopped it

    out = tmp_path / "early"
    patience = EarlyStopping(monitor="val/loss", patience=1, min_delta=10.0)  # no evaluation improves by 10
    stopped = build(out, steps=40, checkpoint=at_end, callbacks=[patience]).fit()
    assert stopped["status"] == "stopped" and stopped["steps"] < 40
    rerun = build(out, steps=40, checkpoint=at_end, resume=plan_resume(out, "auto")).fit()
    assert rerun["status"] == "stopped" and rerun["steps"] == stopped["steps"]  # an early stop is final


def test_request_stop_is_resumable_only_if_every_request_was():
    from accelengine.state import State

    for requests, resumable in [
        ([True], True),
        ([False], False),
        ([True, False], False),
        ([False, True], False),
        ([True, True], True),
    ]:
        state = State()
        for i, flag in enumerate(requests):
            state.request_stop(f"reason {i}", resumable=flag)
        assert state.should_stop and state.stop_reason == "reason 0" and state.stop_resumable is resumable


@pytest.mark.parametrize("scaler_at", ["resume", "save"], ids=["to-fp16", "from-fp16"])
def test_mixed_precision_may_change_to_or_from_fp16_on_resume(tmp_path, monkeypatch, scaler_at):
    """fp16 on a GPU brings a gradient scaler, `no` and `bf16` none; simulated here with a CPU scaler."""
    make_accelerator = Engine._make_accelerator

    def with_scaler(self):
        accelerator = make_accelerator(self)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        return accelerator

    if scaler_at == "save":
        monkeypatch.setattr(Engine, "_make_accelerator", with_scaler)
    build(tmp_path, steps=4).fit()
    saved = read_checkpoint(find_latest(tmp_path / "checkpoints"))
    assert ("scaler" in saved.parts) is (scaler_at == "save")
    monkeypatch.setattr(Engine, "_make_accelerator", with_scaler if scaler_at == "resume" else make_accelerator)
    resumed = build(tmp_path, steps=8, resume=find_latest(tmp_path / "checkpoints"))
    assert resumed.fit()["steps"] == 8
    if scaler_at == "resume":
        assert resumed.accelerator.scaler.get_scale() == 1024.0  # started fresh


def test_a_checkpoint_without_a_model_is_refused_by_name(tmp_path):
    from accelengine.checkpoint import CheckpointManager

    build(tmp_path / "run", steps=2).fit()
    meta = read_checkpoint(find_latest(tmp_path / "run" / "checkpoints")).meta
    foreign = CheckpointManager(tmp_path / "foreign").save("step-1", shared={"notes": {"a": 1}}, meta=meta)
    with pytest.raises(EngineError, match=r"step-1 holds no model"):
        build(tmp_path / "other", steps=2, resume=foreign).fit()


def test_a_checkpoint_monitor_the_evaluation_does_not_produce_is_named(tmp_path):
    checkpoint = CheckpointConfig(every_steps=2, monitor="val/acuracy", mode="max")
    with pytest.raises(EngineError, match=r"`checkpoint.monitor` is `val/acuracy`.*`val/loss`, `val/accuracy`"):
        build(tmp_path, steps=4, checkpoint=checkpoint).fit()


def test_a_checkpoint_monitor_whose_name_says_no_direction_needs_a_mode_in_python_too(tmp_path):
    with pytest.raises(ValueError, match=r"`checkpoint.mode`: cannot tell whether a smaller or a larger `val/score`"):
        build(tmp_path, steps=2, checkpoint=CheckpointConfig(monitor="val/score"))
    engine = build(tmp_path, steps=2, checkpoint=CheckpointConfig(monitor="val/loss"))
    (checkpointer,) = [cb for cb in engine.callbacks if type(cb).__name__ == "Checkpointer"]
    assert checkpointer.mode == "min"


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    """`trainer.device` may change on resume: CUDA random states (simulated here) are skipped where no GPU is."""
    import accelengine.restart as restart

    real = restart.rng_state

    def with_cuda(kinds=None):
        state = real(kinds)
        if kinds is None:
            state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
        return state

    monkeypatch.setattr(restart, "rng_state", with_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(Crash):
        build(tmp_path, steps=8, callbacks=[CrashAt(6)]).fit()
    monkeypatch.setattr(restart, "rng_state", real)
    assert "cuda" in read_checkpoint(find_latest(tmp_path / "checkpoints")).parts["rng"]["now"]
    resumed = build(tmp_path, steps=8, resume=plan_resume(tmp_path, "auto"))
    assert resumed.fit()["steps"] == 8
    assert "WARNING the saved CUDA random states are not restored" in (tmp_path / "log.txt").read_text()
    straight = build(tmp_path / "straight", steps=8)
    straight.fit()
    assert_identical(straight, resumed)


def test_a_changed_gradient_accumulation_is_refused_also_when_the_launcher_set_it(tmp_path, monkeypatch):
    """`trainer.grad_accum` unset takes `accelerate launch --gradient_accumulation_steps`, which the recipe does not
    record: the checkpoint does, so a re-launch with another value cannot resume into a different training."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    build(tmp_path, steps=4).fit()
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    with pytest.raises(EngineError, match=r"over 2 micro-batch\(es\).*over 1 .*`trainer.grad_accum = 2`"):
        build(tmp_path, steps=8, resume=plan_resume(tmp_path, "auto")).fit()
    assert build(tmp_path, steps=8, grad_accum=2, resume=plan_resume(tmp_path, "auto")).fit()["steps"] == 8


def test_resuming_from_an_older_checkpoint_of_the_run_is_what_a_rerun_continues(tmp_path):
    """`--resume step-4` while steps 8 and 12 exist abandons them: a crash before the next save must not send the
    re-run (`auto`) back to the abandoned step 12."""
    keep = CheckpointConfig(every_steps=4, keep_last=3)
    build(tmp_path, steps=12, checkpoint=keep).fit()
    checkpoints = tmp_path / "checkpoints"
    assert find_latest(checkpoints).name == "step-00000012"
    with pytest.raises(Crash):
        build(tmp_path, steps=12, checkpoint=keep, callbacks=[CrashAt(6)], resume=checkpoints / "step-00000004").fit()
    assert plan_resume(tmp_path, "auto").name == "step-00000004"
    log = (tmp_path / "log.txt").read_text()
    assert "step-00000008, step-00000012 (of the abandoned continuation)" in log, log[-2000:]
    resumed = build(tmp_path, steps=12, checkpoint=keep, resume=plan_resume(tmp_path, "auto"))
    resumed.fit()
    straight = build(tmp_path / "straight", steps=12, checkpoint=keep)
    straight.fit()
    assert_identical(straight, resumed)
    assert find_latest(checkpoints).name == "step-00000012"


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    build(tmp_path, steps=12, checkpoint=CheckpointConfig(every_steps=2, keep_last=0)).fit()
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == [f"step-{s:08d}" for s in range(2, 13, 2)]
