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
