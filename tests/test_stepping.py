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
