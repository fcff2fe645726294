"""From a validated recipe to a ready engine: seed first, then every component."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from accelengine.engine import Engine
from accelengine.errors import EngineError
from accelengine.recipe.components import instantiate
from accelengine.recipe.schema import Recipe
from accelengine.recipe.validate import recipe_to_dict


def build_engine(recipe: Recipe, out_dir: str | Path | None = None, resume_from: str | Path | None = None) -> Engine:
    """Instantiate every component of the recipe and the engine class it names."""
    set_seed(recipe.seed)  # before the model is built: its initial weights depend on it
    model = instantiate(recipe.model)
    data = {name: instantiate(section.dataset) for name, section in recipe.data.loaders.items()}
    for name, ds in data.items():
        if ds is None:
            raise EngineError(f"`data.{name}.dataset` returned nothing: the component must return a data set")
    loss = instantiate(recipe.loss) if recipe.loss else None
    metrics = {name: instantiate(spec) for name, spec in recipe.metrics.items()}
    callbacks = [instantiate(spec) for spec in recipe.callbacks]
    optimizer = _factory(recipe.optim) if recipe.optim else None
    scheduler = _factory(recipe.scheduler) if recipe.scheduler else None
    engine = instantiate(
        recipe.engine,
        model=model,
        data=data,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        metrics=metrics,
        callbacks=callbacks,
        config=recipe.trainer,
        data_config=recipe.data,
        checkpoint_config=recipe.checkpoint,
        log_config=recipe.log,
        seed=recipe.seed,
        out_dir=out_dir,
        recipe=recipe_to_dict(recipe),
        resume_from=resume_from,
    )
    if not isinstance(engine, Engine):
        raise EngineError(f"`engine` must name accelengine.Engine or a subclass, got {type(engine).__name__}")
    return engine


def _factory(spec: Any):
    """Components that need run-time arguments (parameters, optimizer) are built by the engine, later. The engine
    offers `total_steps` to a scheduler factory; `instantiate` passes it on only to targets that accept it."""

    def make(first: Any, total_steps: int | None = None) -> Any:
        return instantiate(spec, first, **({} if total_steps is None else {"total_steps": total_steps}))

    return make
