"""The run directory's records at the start: `recipe.toml`, `env.json` and, with `log.copy_code`, a snapshot of the
source files in `code/`. (`log.txt` is opened by `Engine.fit` before anything else, `summary.json` is written at the
end by `RunSummary`.)"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from accelengine.callbacks.base import Callback
from accelengine.recipe.toml_io import dump_toml
from accelengine.rundir import environment, snapshot_code, write_json

logger = logging.getLogger("accelengine")


class RunFiles(Callback):
    """Writes the run's records; only the main process writes, the others only log warnings.

    Args:
        copy_code: globs of source files to copy into `RUN_DIR/code/` (relative to `engine.code_root`: the
            recipe's directory for recipe runs, else the working directory).
    """

    def __init__(self, copy_code: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__()
        self.copy_code = list(copy_code)

    def before_fit(self, engine) -> None:
        out = engine.out_dir
        main = engine.is_main_process  # the run directory exists: `Engine.fit` made it as it opened `log.txt`
        if main and not engine.config.deterministic:
            logger.warning(
                "not deterministic: reruns may differ slightly; set `trainer.deterministic = true` "
                "(TrainerConfig(deterministic=True)) for repeatable results, at some speed cost"
            )
        if out is None or not main:
            return
        if engine.recipe is not None:
            header = f"resolved recipe (every default filled in); run it again with:\naccelengine run {out}/recipe.toml"
            (Path(out) / "recipe.toml").write_text(dump_toml(engine.recipe, header), encoding="utf-8")
        env = environment(engine.accelerator, engine.seed)
        # Names this attempt: `summary.json` carries it too, so a summary left by an earlier attempt of the same run
        # directory (this one then killed before writing its own) is told apart exactly.
        env["attempt"] = engine.summary_extras["attempt"] = uuid.uuid4().hex
        if getattr(engine, "code_root", None) is not None:  # a re-run of `RUN_DIR/recipe.toml` imports from here
            env["recipe_dir"] = str(engine.code_root)
        if self.copy_code:
            root = Path(getattr(engine, "code_root", None) or Path.cwd())
            env["code_snapshot"] = snapshot_code(self.copy_code, root, Path(out) / "code")
        write_json(Path(out) / "env.json", env)
