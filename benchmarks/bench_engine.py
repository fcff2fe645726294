"""Steps of the engine against a bare PyTorch loop and a hand-written Accelerate loop (tiny MLP 64-32-10, batch 64,
SGD, one thread), and resuming at batch 0 against batch 100,000.

    python -m pytest benchmarks/bench_engine.py --benchmark-only --benchmark-group-by=group

Each round runs `STEPS` steps on objects built in an untimed setup (model, optimizer, loader; for the engine,
`Engine(...)` and `setup()`), so the figure is `STEPS` times the per-step cost plus one loop start-up (for the
engine: `fit()`'s before/after hooks, about a millisecond). `overhead.py` measures the steady state alone and
prints the ratios.
"""

from __future__ import annotations

import pytest
import torch
from overhead import make_workload
from torch import nn

STEPS = 500
ROUNDS = 7


@pytest.fixture(scope="module")
def workload():
    return make_workload(hidden=32, batch=64, batches=64)


def _steps(model, loss_fn, opt, loader, backward) -> None:
    done = 0
    while done < STEPS:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == STEPS:
                return


@pytest.mark.benchmark(group=f"{STEPS} steps, tiny MLP")
def test_raw_loop(benchmark, workload):
    from accelengine.data import make_loader

    dataset, make_model = workload

    def setup():
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = make_loader(dataset, batch_size=64, shuffle=True)
        return (model, nn.CrossEntropyLoss(), opt, loader, torch.Tensor.backward), {}

    benchmark.pedantic(_steps, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group=f"{STEPS} steps, tiny MLP")
def test_accelerate_loop(benchmark, workload):
    from accelerate import Accelerator

    from accelengine.data import make_loader

    dataset, make_model = workload

    def setup():
        accelerator = Accelerator(cpu=True)
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model, opt, loader = accelerator.prepare(model, opt, make_loader(dataset, batch_size=64, shuffle=True))
        return (model, nn.CrossEntropyLoss(), opt, loader, accelerator.backward), {}

    benchmark.pedantic(_steps, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("callbacks", ["default-callbacks", "no-callbacks"])
@pytest.mark.benchmark(group=f"{STEPS} steps, tiny MLP")
def test_engine(benchmark, workload, callbacks):
    from accelengine import DataConfig, Engine, LogConfig, TrainerConfig

    dataset, make_model = workload

    def setup():
        engine = Engine(
            model=make_model(),
            data={"train": dataset},
            loss=nn.CrossEntropyLoss(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
            config=TrainerConfig(steps=STEPS, log_every=50, device="cpu"),
            data_config=DataConfig(batch_size=64),
            log_config=LogConfig(summary=False),  # the rest as by default
        )
        if callbacks == "no-callbacks":
            engine.callbacks = []
        engine.setup()
        return (engine,), {}

    benchmark.pedantic(Engine.fit, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.fixture(scope="module")
def resume_points(tmp_path_factory):
    """Checkpoints at batch 0 and batch 100,000 of one epoch (see `resume_skip.py` for how they are made)."""
    from resume_skip import make_dataset, write_checkpoint

    dataset = make_dataset(100_000)
    root = tmp_path_factory.mktemp("resume")
    return dataset, {b: write_checkpoint(dataset, root / f"saved-{b}", b) for b in (0, 100_000)}


@pytest.mark.parametrize("batch", [0, 100_000])
@pytest.mark.benchmark(group="resume: fit() of a resumed engine to the end of its first step")
def test_resume_at(benchmark, resume_points, batch):
    """`fit()` on an engine built (untimed) with `resume_from`: restore, skip `batch` batches by index, one step.
    No run directory, so nothing is written after the step."""
    from resume_skip import make_engine

    from accelengine import Engine

    dataset, checkpoints = resume_points

    def setup():
        return (make_engine(dataset, None, steps=batch + 1, resume_from=checkpoints[batch]),), {}

    benchmark.pedantic(Engine.fit, setup=setup, rounds=ROUNDS, warmup_rounds=1)
