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


def test_take_floats_reads_the_same_means_on_the_host(monkeypatch):
    """The CPU path (values read directly, summed in Python) gives the device path's means, folds and terms
    included, and starts a new window the same way."""
    monkeypatch.setattr(loss_window, "FOLD", 4)

    def filled():
        window = LossWindow()
        for i, v in enumerate(values(11)):
            window.add({"loss": v, "kl": v * 2} if i % 3 else {"loss": v})
        window.append(torch.tensor([0.5]))  # a (1,)-shaped loss beside 0-dim ones
        return window

    on_device, on_host = filled(), filled()
    names, means = on_device.take()
    host_names, host_means = on_host.take_floats()
    assert host_names == names == ["loss", "kl"]
    assert host_means == pytest.approx(means.tolist(), rel=1e-6)
    assert len(on_host) == 0 and on_host.take_floats() == ([], [])
