"""Shared helpers: tiny real data sets and engines that train in well under a second on a CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests must not pick up a developer's Accelerate config or launcher variables.
for _var in [v for v in os.environ if v.startswith("ACCELERATE_")] + ["WORLD_SIZE", "RANK", "LOCAL_RANK"]:
    os.environ.pop(_var, None)
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device; CI has none, so they are skipped there (and run where one is lent)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _engine_logging_restored():
    """A run sets up the `accelengine` logger (handlers, `propagate = False`): put it back after every test, so that
    tests which capture log records (caplog) see them whatever order the tests run in."""
    from tests.callbacks.helpers import pristine_logging

    with pristine_logging():
        yield


@pytest.fixture
def tiny_data():
    from accelengine.examples.synthetic import classification

    return {
        "train": classification(samples=96, features=8, classes=3),
        "val": classification(samples=40, features=8, classes=3, seed=1),
    }


@pytest.fixture
def make_engine(tiny_data):
    """Factory for a small CPU engine; keyword arguments override the defaults."""
    from accelengine import MLP, Accuracy, DataConfig, Engine, TrainerConfig

    def make(engine_cls=Engine, data=None, config=None, batch_size=16, **kw):
        torch.manual_seed(0)
        kw.setdefault("loss", torch.nn.CrossEntropyLoss())
        kw.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.1))
        kw.setdefault("metrics", {"accuracy": Accuracy()})
        return engine_cls(
            model=kw.pop("model", None) or MLP(8, 3, hidden=[16]),
            data=tiny_data if data is None else data,
            config=config or TrainerConfig(epochs=2, device="cpu", log_every=2),
            data_config=DataConfig(batch_size=batch_size),
            **kw,
        )

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m accelengine ...` in a fresh process."""
    import subprocess

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "accelengine", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_command(processes: int, *args: str) -> list[str]:
    """`accelerate launch` of `python -m accelengine ARGS` with N CPU processes, every launcher setting explicit so a
    developer's Accelerate config cannot change what the test does."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no"]
    cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    return [*cmd, "-m", "accelengine", *args]


def launch_env() -> dict[str, str]:
    """The environment without any `ACCELERATE_*` variable a launcher or the developer set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {"PYTHONUNBUFFERED": "1"}
