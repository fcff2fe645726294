"""EMA: the averages equal a hand computation; the swap for evaluation; export; checkpoint state."""

from __future__ import annotations

import math

import pytest
import torch

from accelengine import Callback
from accelengine.callbacks import EMA
from accelengine.callbacks.ema import momentum_at

from .helpers import tiny_engine, weights


class Snapshots(Callback):
    """The model's weights before training and after every optimizer step (registered after the EMA)."""

    def __init__(self):
        super().__init__()
        self.seen: list[dict[str, torch.Tensor]] = []

    def before_fit(self, engine):
        self.seen.append(weights(engine))

    def after_fit_step(self, engine):
        self.seen.append(weights(engine))


def hand_ema(snapshots, momenta):
    ema = {k: v.clone() for k, v in snapshots[0].items()}
    for w, m in zip(snapshots[1:], momenta, strict=True):
        ema = {k: m * ema[k] + (1 - m) * w[k] for k in ema}
    return ema


def test_constant_momentum_matches_hand_computation():
    ema, snaps = EMA(momentum=0.9, schedule="constant"), Snapshots()
    tiny_engine(callbacks=[ema, snaps], steps=2).fit()
    expected = hand_ema(snaps.seen, [0.9, 0.9])
    got = ema.ema_state_dict()
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    assert not torch.equal(got["0.weight"], snaps.seen[-1]["0.weight"])  # an average, not the weights


def test_cosine_schedule_rises_to_one():
    assert momentum_at(0, 4, 0.9) == pytest.approx(0.9)
    assert momentum_at(2, 4, 0.9) == pytest.approx(0.95)
    assert momentum_at(4, 4, 0.9) == pytest.approx(1.0)
    assert momentum_at(1, 4, 0.9) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)
    ema, snaps = EMA(momentum=0.9), Snapshots()
    tiny_engine(callbacks=[ema, snaps], steps=3).fit()
    momenta = [momentum_at(i, 3, 0.9) for i in range(3)]  # 0.9, then rising
    expected = hand_ema(snaps.seen, momenta)
    for k, v in ema.ema_state_dict().items():
        torch.testing.assert_close(v, expected[k])
    assert ema.updates == 3


def test_every_n_steps():
    ema, snaps = EMA(momentum=0.5, schedule="constant", every_n_steps=2), Snapshots()
    tiny_engine(callbacks=[ema, snaps], steps=4).fit()
    expected = hand_ema([snaps.seen[0], snaps.seen[2], snaps.seen[4]], [0.5, 0.5])
    for k, v in ema.ema_state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_used_for_evaluation_then_swapped_back():
    ema = EMA(momentum=0.9, schedule="constant", use_for_eval=True)
    engine = tiny_engine(callbacks=[ema], steps=4, eval_every=4)
    engine.fit()
    trained = weights(engine)
    ema_result = dict(engine.state.last_eval)
    # The trained weights are back in the model ...
    assert not torch.equal(trained["0.weight"], ema.ema_state_dict()["0.weight"])
    plain = engine.evaluate()  # ... the EMA swaps in again for this call: same numbers
    assert plain == pytest.approx(ema_result)
    torch.testing.assert_close(weights(engine)["0.weight"], trained["0.weight"])
    # evaluating a model loaded with the exported averages gives the reported metrics
    ema.use_for_eval = False
    ema.copy_to(engine.unwrapped_model())
    assert engine.evaluate() == pytest.approx(ema_result)


def test_state_round_trip_before_and_after_binding():
    ema = EMA(momentum=0.8, schedule="constant")
    tiny_engine(callbacks=[ema], steps=3).fit()
    state = ema.state_dict()
    assert state["updates"] == 3 and all(isinstance(v, torch.Tensor) for v in state["params"].values())

    restored = EMA(momentum=0.8, schedule="constant")
    restored.load_state_dict(state)  # before training: applied when the model is bound
    engine = tiny_engine(callbacks=[restored], steps=3)
    engine.setup()
    restored.before_fit(engine)
    for k, v in ema.ema_state_dict().items():
        torch.testing.assert_close(restored.ema_state_dict()[k], v)
    assert restored.updates == 3

    bound = EMA()
    bound.before_fit(engine)
    bound.load_state_dict(state)  # after binding: copied in place
    torch.testing.assert_close(bound.params["0.weight"], state["params"]["0.weight"])
    with pytest.raises(ValueError, match="another model"):
        bound.load_state_dict({"params": {}, "buffers": {}, "updates": 0})


def test_no_averages_before_training():
    with pytest.raises(RuntimeError, match="when training starts"):
        EMA().ema_state_dict()
    with pytest.raises(ValueError, match="momentum"):
        EMA(momentum=1.5)


def test_resumed_run_has_the_same_averages(tmp_path):
    from accelengine import CheckpointConfig

    from .test_trackers import Crash

    ckpt = CheckpointConfig(every_steps=4, at_end=False)
    straight = EMA(momentum=0.9)
    tiny_engine(callbacks=[straight], out_dir=tmp_path / "a", steps=8, checkpoint=ckpt).fit()

    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_engine(callbacks=[EMA(momentum=0.9), Crash()], out_dir=tmp_path / "b", steps=8, checkpoint=ckpt).fit()
    resumed = EMA(momentum=0.9)
    tiny_engine(
        callbacks=[resumed],
        out_dir=tmp_path / "b",
        steps=8,
        checkpoint=ckpt,
        resume_from=tmp_path / "b" / "checkpoints" / "step-00000004",
    ).fit()
    assert resumed.updates == 8
    for k, v in straight.ema_state_dict().items():
        torch.testing.assert_close(resumed.ema_state_dict()[k], v, rtol=0, atol=0)


def test_trained_weights_come_back_when_an_evaluation_is_cut_short():
    from accelengine import Callback

    trained = {}

    class Boom(Callback):
        def fit_step(self, engine):  # the weights the step trained, before its evaluation
            trained.update(weights(engine))

        def after_eval_step(self, engine):
            raise RuntimeError("cut short")

    ema = EMA(momentum=0.5, schedule="constant", use_for_eval=True)
    engine = tiny_engine(callbacks=[ema, Boom()], steps=2, eval_every=2)
    with pytest.raises(RuntimeError, match="cut short"):
        engine.fit()
    torch.testing.assert_close(weights(engine)["0.weight"], trained["0.weight"], rtol=0, atol=0)
    assert not torch.equal(trained["0.weight"], ema.ema_state_dict()["0.weight"])


class TiedNet(torch.nn.Module):
    """An encoder whose decoder shares its weight (as a language model ties its embedding and output layer)."""

    def __init__(self):
        super().__init__()
        self.encode = torch.nn.Linear(8, 8, bias=False)
        self.decode = torch.nn.Linear(8, 8, bias=False)
        self.decode.weight = self.encode.weight
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.decode(torch.relu(self.encode(x)))))


def test_export_with_tied_weights():
    ema, snaps = EMA(momentum=0.5, schedule="constant"), Snapshots()
    engine = tiny_engine(callbacks=[ema, snaps], steps=2)
    engine.model = TiedNet()
    engine.fit()
    exported = ema.ema_state_dict()
    assert set(exported) == {"encode.weight", "decode.weight", "head.weight", "head.bias"}
    expected = hand_ema(snaps.seen, [0.5, 0.5])
    for k in exported:
        torch.testing.assert_close(exported[k], expected[k])
    fresh = TiedNet()
    ema.copy_to(fresh)
    torch.testing.assert_close(fresh.decode.weight.detach(), expected["encode.weight"])
    assert fresh.decode.weight is fresh.encode.weight  # still tied


class Streamed(torch.utils.data.IterableDataset):
    def __init__(self, base):
        self.base = base

    def __iter__(self):
        return iter(self.base)


def test_epochs_of_a_train_set_without_a_length():
    # the cosine schedule needs the number of steps, unknown here: a clear error before training; constant: trains
    from accelengine import EngineError, LogConfig

    def engine_with(ema):
        engine = tiny_engine(callbacks=[ema], epochs=2, log=LogConfig(progress=False, nan_guard="off"))
        engine.loaders["train"] = Streamed(engine.loaders["train"])
        return engine

    with pytest.raises(
        EngineError, match=r"cosine momentum schedule needs the number of training steps.*`trainer\.steps`"
    ):
        engine_with(EMA(momentum=0.9)).fit()
    constant = EMA(momentum=0.9, schedule="constant")
    summary = engine_with(constant).fit()
    assert summary["status"] == "completed" and constant.updates == 8
