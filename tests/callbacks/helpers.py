"""A tiny real training run for the callback tests: 64 samples of 8 features, 3 classes, batches of 16 (4 optimizer
steps per epoch), an MLP, SGD, on the CPU. Each run takes well under a second."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from accelengine import MLP, Accuracy, Callback, DataConfig, Engine, LogConfig, TrainerConfig
from accelengine.examples.synthetic import classification


def tiny_engine(
    engine_cls: type[Engine] = Engine,
    *,
    callbacks=(),
    log: LogConfig | None = None,
    out_dir=None,
    lr: float = 0.1,
    optimizer=None,
    scheduler=None,
    batch_size: int = 16,
    checkpoint=None,
    resume_from=None,
    **trainer: Any,
) -> Engine:
    """Keyword arguments beyond the named ones go to `TrainerConfig` (default: 2 epochs, log every 2 steps)."""
    torch.manual_seed(0)
    trainer.setdefault("log_every", 2)
    if "steps" not in trainer:
        trainer.setdefault("epochs", 2)
    data = {
        "train": classification(samples=64, features=8, classes=3),
        "val": classification(samples=32, features=8, classes=3, seed=1),
    }
    return engine_cls(
        model=MLP(8, 3, hidden=[16]),
        data=data,
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=lr)),
        scheduler=scheduler,
        metrics={"accuracy": Accuracy()},
        callbacks=callbacks,
        config=TrainerConfig(device="cpu", **trainer),
        data_config=DataConfig(batch_size=batch_size),
        checkpoint_config=checkpoint,
        log_config=log or LogConfig(progress=False),
        out_dir=out_dir,
        **({"resume_from": resume_from} if resume_from is not None else {}),
    )


class Recorder(Callback):
    """Keeps every logged record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict] = []

    def on_log(self, engine, record):
        self.records.append(dict(record))

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if key in r]


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.unwrapped_model().state_dict().items()}


@contextlib.contextmanager
def pristine_logging() -> Iterator[None]:
    """Restore the `accelengine` logger's handlers, level and propagation (a run's `setup_logging` changes them)."""
    log = logging.getLogger("accelengine")
    saved = (list(log.handlers), log.level, log.propagate)
    try:
        yield
    finally:
        for handler in [h for h in log.handlers if h not in saved[0]]:
            log.removeHandler(handler)
            handler.close()
        log.handlers[:] = saved[0]
        log.setLevel(saved[1])
        log.propagate = saved[2]
