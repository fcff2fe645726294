"""accelengine: a small, fast training engine for PyTorch on HuggingFace Accelerate, driven by TOML recipes.

    from accelengine import Engine, TrainerConfig
    summary = Engine(model, {"train": ds}, loss=loss, optimizer=make_opt, config=TrainerConfig(epochs=3)).fit()

or from a recipe: `accelengine run recipe.toml` / `accelengine.run("recipe.toml")`; sessions of experiments with
`accelengine.run_session("session.toml")`; `accelengine.evaluate` and `accelengine.export_weights` for checkpoints.
"""

from __future__ import annotations

__version__ = "0.1.0"

from accelengine.callbacks.base import HOOKS, Callback
from accelengine.engine import CheckpointConfig, DataConfig, Engine, LogConfig, TrainerConfig
from accelengine.errors import EngineError, RecipeError
from accelengine.metrics import Accuracy, MeanLoss
from accelengine.models import MLP
from accelengine.runner import evaluate, export_weights, run
from accelengine.state import State
from accelengine.sweep import expand, run_session

__all__ = [
    "HOOKS",
    "MLP",
    "Accuracy",
    "Callback",
    "CheckpointConfig",
    "DataConfig",
    "Engine",
    "EngineError",
    "LogConfig",
    "MeanLoss",
    "RecipeError",
    "State",
    "TrainerConfig",
    "__version__",
    "evaluate",
    "expand",
    "export_weights",
    "run",
    "run_session",
]
