"""`run`: a recipe file to a finished run directory (what `accelengine run` does)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelengine.build import build_engine
from accelengine.recipe.validate import load_recipe
from accelengine.rundir import default_run_dir


def run(recipe_path: str | Path, overrides: list[str] | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Validate the recipe, build everything, train/evaluate, and return the summary (also in `summary.json`)."""
    recipe = load_recipe(recipe_path, overrides)
    out_dir = Path(out) if out is not None else default_run_dir(recipe.name)
    engine = build_engine(recipe, out_dir)
    return engine.fit()
