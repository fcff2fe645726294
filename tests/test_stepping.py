"""The direct optimizer path and the path through Accelerate's wrappers train identically."""

from __future__ import annotations

import pytest
import torch

from accelengine import MLP, DataConfig, Engine, TrainerConfig
from accelengine.examples.synthetic import classification
from accelengine.stepping import OptimizerDriver


def train(force_accelerate: bool, **config):
    torch.manual_seed(0)
    engine = Engine(
        model=MLP(8, 3, hidden=[16], dropout=0.1),
        data={"train": classification(samples=64, features=8, classes=3)},
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        config=TrainerConfig(steps=9, device="cpu", log_every=1, **config),
        data_config=DataConfig(batch_size=8),
    )
    engine.setup()
    engine.driver = OptimizerDriver(engine.accelerator, engine.optimizer, force_accelerate=force_accelerate)
    losses = []
    engine.log = lambda values: losses.append(values.get("train/loss"))
    engine.fit()
    return engine, losses


@pytest.mark.parametrize(
    "config", [{}, {"grad_accum": 3}, {"max_grad_norm": 0.5}], ids=["plain", "accumulation", "clipping"]
)
def test_direct_and_accelerate_paths_are_identical(config):
    direct, direct_losses = train(False, **config)
    general, general_losses = train(True, **config)
    assert direct.driver.path == "direct" and general.driver.path == "accelerate"
    assert direct_losses == general_losses and len(direct_losses) == 9
    for (name, a), b in zip(
        direct.unwrapped_model().state_dict().items(), general.unwrapped_model().state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert direct.scheduler.get_last_lr() == general.scheduler.get_last_lr()


def test_scaler_forces_the_accelerate_path():
    engine, _ = train(False)

    engine.accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16 on a GPU gives
    assert OptimizerDriver(engine.accelerator, engine.optimizer).path == "accelerate"


def test_direct_loader_and_accelerate_loader_train_identically():
    """One CPU process iterates the loader it built; a DataLoader given as such goes through Accelerate's wrapper.
    Both see the same batches in the same order (shuffled, two epochs), so training is bit for bit the same."""
    from accelerate.data_loader import DataLoaderShard

    from accelengine.data import make_loader

    def run(wrap: bool):
        torch.manual_seed(0)
        data = classification(samples=60, features=8, classes=3)
        engine = Engine(
            model=MLP(8, 3, hidden=[16], dropout=0.1),
            data={"train": make_loader(data, batch_size=8, shuffle=True) if wrap else data},
            loss=torch.nn.CrossEntropyLoss(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            config=TrainerConfig(epochs=2, device="cpu", log_every=1),
            data_config=DataConfig(batch_size=8),
        )
        losses = []
        engine.log = lambda values: losses.append(values.get("train/loss"))
        engine.fit()
        return engine, losses

    direct, direct_losses = run(wrap=False)
    wrapped, wrapped_losses = run(wrap=True)
    assert not isinstance(direct.train_loader, DataLoaderShard) and isinstance(wrapped.train_loader, DataLoaderShard)
    assert direct_losses == wrapped_losses and len(direct_losses) == 16
    for a, b in zip(direct.unwrapped_model().parameters(), wrapped.unwrapped_model().parameters(), strict=True):
        assert torch.equal(a, b)


def test_accumulation_keeps_accelerate_loader():
    """Accumulation needs the wrapper: it marks the epoch's last batch, where Accelerate syncs an uneven cycle."""
    from accelerate.data_loader import DataLoaderShard

    engine, _ = train(False, grad_accum=3)
    assert isinstance(engine.train_loader, DataLoaderShard)


def annotations_opened(monkeypatch) -> list[str]:
    """The names of torch's profiler annotations (`record_function`) opened from now on, in order."""
    opened = []
    enter = torch.autograd.profiler.record_function.__enter__

    def counting_enter(self):
        opened.append(self.name)
        return enter(self)

    monkeypatch.setattr(torch.autograd.profiler.record_function, "__enter__", counting_enter)
    return opened


def steps_of(optimizer, step, zero_grad, model, steps=5):
    for i in range(steps):
        torch.manual_seed(i)
        model(torch.randn(4, 6)).square().mean().backward()
        step()
        zero_grad()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=1e-2),
        lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True),
    ],
    ids=["sgd", "adamw", "adam-foreach"],
)
def test_lean_optimizer_calls_train_as_torchs_own_without_their_per_call_annotation(make_optimizer, monkeypatch):
    import warnings

    from accelengine.stepping import lean_optimizer_calls

    def run(lean: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        optimizer = make_optimizer(model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        step, zero_grad = lean_optimizer_calls(optimizer) if lean else (optimizer.step, optimizer.zero_grad)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps_of(optimizer, lambda: (step(), scheduler.step()), zero_grad, model)
        assert not [w for w in caught if "lr_scheduler" in str(w.message)], [str(w.message) for w in caught]
        return model, optimizer, scheduler

    opened = annotations_opened(monkeypatch)
    torch_model, torch_optimizer, torch_scheduler = run(lean=False)
    assert len(opened) == 10  # torch's calls: an annotation per step and per zero_grad
    opened.clear()
    lean_model, lean_optimizer, lean_scheduler = run(lean=True)
    # the first step goes through the scheduler's call tracker (the warning it guards stays quiet); then none
    assert opened == [f"Optimizer.step#{type(lean_optimizer).__name__}.step"]
    for a, b in zip(torch_model.parameters(), lean_model.parameters(), strict=True):
        assert torch.equal(a, b) and b.grad is None
    for a, b in zip(torch_optimizer.state.values(), lean_optimizer.state.values(), strict=True):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    assert torch_scheduler.get_last_lr() == lean_scheduler.get_last_lr()


def test_lean_optimizer_calls_take_torchs_full_call_for_hooks_wrappers_and_the_profiler(monkeypatch):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from accelengine.stepping import lean_optimizer_calls

    model = torch.nn.Linear(6, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step, zero_grad = lean_optimizer_calls(optimizer)
    opened = annotations_opened(monkeypatch)
    steps_of(optimizer, step, zero_grad, model, steps=2)
    assert opened == []  # nothing that needs torch's call: the lean one

    calls = []
    handle = optimizer.register_step_pre_hook(lambda *args: calls.append("pre"))
    steps_of(optimizer, step, zero_grad, model, steps=2)
    handle.remove()
    handle = register_optimizer_step_post_hook(lambda *args: calls.append("global post"))
    steps_of(optimizer, step, zero_grad, model, steps=1)
    handle.remove()
    plain_step = optimizer.step
    optimizer.step = lambda: (calls.append("wrapper"), plain_step())
    steps_of(optimizer, step, zero_grad, model, steps=1)
    del optimizer.step
    assert calls == ["pre", "pre", "global post", "wrapper"]

    opened.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        steps_of(optimizer, step, zero_grad, model, steps=1)
    names = {event.name for event in profiler.events()}
    assert {"Optimizer.step#SGD.step", "Optimizer.zero_grad#SGD.zero_grad"} <= names
    opened.clear()
    steps_of(optimizer, step, zero_grad, model, steps=2)
    assert opened == [] and all(p.grad is None for p in model.parameters())


def test_the_direct_driver_uses_the_lean_calls():
    engine, _ = train(False)
    assert engine.driver.step.__qualname__.startswith("lean_optimizer_calls")
    assert engine.driver.zero_grad.__qualname__.startswith("lean_optimizer_calls")


def test_a_gradient_scaler_and_a_scheduler_train_without_a_scheduler_warning(monkeypatch, recwarn):
    """fp16 on a GPU brings a gradient scaler (simulated with a CPU one): Accelerate's optimizer then swaps its
    `step` around every call and puts back the method it saw at `prepare`. A scheduler made after that had its
    call tracker dropped, and torch warned that `optimizer.step()` was overridden after the scheduler was made."""
    make_accelerator = Engine._make_accelerator

    def with_scaler(self):
        accelerator = make_accelerator(self)
        accelerator.scaler = torch.amp.GradScaler("cpu")
        return accelerator

    plain, plain_losses = train(False)
    monkeypatch.setattr(Engine, "_make_accelerator", with_scaler)
    scaled, scaled_losses = train(False)
    assert scaled.driver.path == "accelerate" and scaled.accelerator.scaler is not None
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message) or "optimizer.step()" in str(w.message)]
    assert scaled.scheduler.get_last_lr() == plain.scheduler.get_last_lr() and scaled.scheduler.last_epoch == 9
    assert len(scaled_losses) == len(plain_losses) == 9
