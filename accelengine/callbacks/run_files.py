"""The run directory's records: `recipe.toml`, `env.json`, `log.txt` at the start, `summary.json` at the end."""

from __future__ import annotations

from pathlib import Path

from accelengine.callbacks.base import Callback
from accelengine.recipe.toml_io import dump_toml
from accelengine.rundir import environment, setup_logging, write_json


class RunFiles(Callback):
    """Writes the run's records; only the main process writes, the others only log warnings."""

    def before_fit(self, engine) -> None:
        out = engine.out_dir
        main = engine.is_main_process
        if out is not None and main:
            Path(out).mkdir(parents=True, exist_ok=True)
        setup_logging(Path(out) if out is not None else None, main, engine.accelerator.process_index)
        if out is None or not main:
            return
        if engine.recipe is not None:
            header = f"resolved recipe (every default filled in); run it again with:\naccelengine run {out}/recipe.toml"
            (Path(out) / "recipe.toml").write_text(dump_toml(engine.recipe, header), encoding="utf-8")
        write_json(Path(out) / "env.json", environment(engine.accelerator, engine.seed))

    def after_fit(self, engine) -> None:
        if engine.out_dir is not None and engine.is_main_process:
            write_json(Path(engine.out_dir) / "summary.json", engine.summary())
