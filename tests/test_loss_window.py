"""The training-loss window: means per term, folding, and an exact round trip through its state_dict."""

from __future__ import annotations

import pytest
import torch

from accelengine import loss_window
from accelengine.loss_window import LossWindow


def values(n: int, seed: int = 0) -> list[torch.Tensor]:
    return list(torch.rand(n, generator=torch.Generator().manual_seed(seed)).unbind(0))


def test_take_gives_the_mean_of_each_term_and_starts_a_new_window():
    window = LossWindow()
    for v in values(5):
        window.append(v)
    window.add({"loss": torch.tensor(2.0), "kl": torch.tensor(4.0)})  # a term seen once: its own count
    names, means = window.take()
    assert names == ["loss", "kl"]
    assert torch.allclose(means, torch.stack([(torch.stack(values(5)).sum() + 2.0) / 6, torch.tensor(4.0)]))
    assert len(window) == 0 and window.take() == ([], None)


def test_folding_bounds_the_window_and_keeps_the_mean(monkeypatch):
    monkeypatch.setattr(loss_window, "FOLD", 4)
    window = LossWindow()
    losses = values(11)
    for v in losses:
        window.append(v)
    assert len(window.loss) < 4 and len(window) == 11
    names, means = window.take()
    assert names == ["loss"] and torch.allclose(means[0], torch.stack(losses).mean())


def test_state_dict_round_trip_is_exact(monkeypatch):
    """A resumed window continues exactly: the next mean is bit for bit the uninterrupted one."""
    monkeypatch.setattr(loss_window, "FOLD", 4)
    losses = values(10, seed=3)
    straight = LossWindow()
    for v in losses:
        straight.append(v)
    first = LossWindow()
    for v in losses[:6]:
        first.append(v)
    resumed = LossWindow()
    resumed.load_state_dict(first.state_dict())
    assert len(resumed) == 6
    for v in losses[6:]:
        resumed.append(v)
    assert torch.equal(straight.take()[1], resumed.take()[1])


def test_load_refuses_a_window_that_does_not_add_up():
    window = LossWindow()
    window.append(torch.tensor(1.0))
    state = window.state_dict()
    state["micro_batches"] = 3
    with pytest.raises(ValueError, match="expected 3"):
        LossWindow().load_state_dict(state)


@pytest.mark.parametrize("on_host", [False, True], ids=["device-window", "host-window"])
def test_take_floats_reads_the_same_means_on_the_host(monkeypatch, on_host):
    """`take_floats` (values summed in Python) gives `take`'s means, folds and terms included, whether the window
    holds tensors or, on the host, floats read as they came; and it starts a new window the same way."""
    monkeypatch.setattr(loss_window, "FOLD", 4)

    def filled(host):
        window = LossWindow(on_host=host)
        for i, v in enumerate(values(11)):
            window.add({"loss": v, "kl": v * 2} if i % 3 else {"loss": v})
        extra = torch.tensor([0.5])  # a (1,)-shaped loss beside 0-dim ones
        window.append(extra.item() if host else extra)
        return window

    on_device, other = filled(False), filled(on_host)
    if on_host:
        assert all(type(v) is float for v in other.loss) and type(other.folded["loss"][0]) is float
    names, means = on_device.take()
    host_names, host_means = other.take_floats()
    assert host_names == names == ["loss", "kl"]
    assert host_means == pytest.approx(means.tolist(), rel=1e-6)
    assert len(other) == 0 and other.take_floats() == ([], [])


@pytest.mark.parametrize("saved_on_host", [False, True])
@pytest.mark.parametrize("loaded_on_host", [False, True])
def test_state_dict_round_trip_between_host_and_device_windows(monkeypatch, saved_on_host, loaded_on_host):
    """A host window saves its floats exactly (float64); either kind of window loads either kind of save, and the
    resumed run's next mean is the uninterrupted one (bit for bit when both are the same kind)."""
    monkeypatch.setattr(loss_window, "FOLD", 4)
    losses = values(10, seed=5)

    def entry(v, on_host):
        return v.item() if on_host else v

    straight = LossWindow(on_host=loaded_on_host)
    for v in losses:
        straight.append(entry(v, loaded_on_host))
    first = LossWindow(on_host=saved_on_host)
    for v in losses[:6]:
        first.append(entry(v, saved_on_host))
    resumed = LossWindow(on_host=loaded_on_host)
    resumed.load_state_dict(first.state_dict())
    assert len(resumed) == 6
    for v in losses[6:]:
        resumed.append(entry(v, loaded_on_host))
    a, b = straight.take_floats()[1], resumed.take_floats()[1]
    if saved_on_host == loaded_on_host:
        assert a == b
    else:
        assert a == pytest.approx(b, rel=1e-6)
