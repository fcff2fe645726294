"""Saving checkpoints on a cadence, on a new best metric, at the end of fit and on preemption."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from accelengine.callbacks.base import Callback
from accelengine.callbacks.progress import monitor_mode
from accelengine.checkpoint import CheckpointError, CheckpointManager
from accelengine.errors import EngineError
from accelengine.recipe.schema import CheckpointSection
from accelengine.restart import CHECKPOINT_DIR, capture

logger = logging.getLogger("accelengine")


class Checkpointer(Callback):
    """Writes `RUN_DIR/checkpoints/step-<N>` (see `checkpoint.py` for the format and its guarantees).

    Saves happen at the end of a step or epoch (`after_fit_step`/`after_fit_epoch`), when that step's logging and
    evaluation are done, so a checkpoint is a complete unit. A new best of `monitor` is saved at the same points.
    """

    def __init__(self, config: CheckpointSection | None = None) -> None:
        super().__init__()
        self.config = config or CheckpointSection()
        monitor = self.config.monitor
        self.mode = monitor_mode(monitor, self.config.mode, "`checkpoint.mode`") if monitor else "max"
        self.best: float | None = None
        self._best_pending = False
        self._saved_at: tuple[int, int, int, int] | None = None
        self.manager: CheckpointManager | None = None

    @property
    def key(self) -> str:
        return "checkpointer"

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]

    def before_fit(self, engine) -> None:
        cfg, acc = self.config, engine.accelerator
        self.manager = CheckpointManager(
            Path(engine.out_dir) / CHECKPOINT_DIR,
            keep_last=cfg.keep_last or None,  # 0 (a recipe cannot say None) keeps all, as None does
            keep_best=cfg.keep_best if cfg.monitor else 0,
            monitor=cfg.monitor,
            mode=self.mode,
            rank=acc.process_index,
            world_size=acc.num_processes,
            barrier=acc.wait_for_everyone,
        )

    def after_eval(self, engine) -> None:
        monitor = self.config.monitor
        if monitor is None or engine.train_loader is None:
            return
        results = engine.state.last_eval
        if results and monitor not in results:  # a typo would otherwise rank nothing, silently
            raise EngineError(
                f"`checkpoint.monitor` is `{monitor}`, which the evaluation does not produce; it produced "
                + ", ".join(f"`{k}`" for k in results)
            )
        value = results.get(monitor)
        if value is None or math.isnan(value):
            return
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best = value
            self._best_pending = True

    def after_fit_step(self, engine) -> None:
        state, every = engine.state, self.config.every_steps
        if not state.optimizer_stepped or state.failed:  # failed: e.g. the NaN guard found a bad step
            return
        # a preemption is saved in `after_fit`, once the earlier callbacks' `after_fit` checked the weights (NanGuard)
        if self._best_pending or (every and state.step % every == 0):
            self.save(engine)

    def after_fit_epoch(self, engine) -> None:
        every = self.config.every_epochs
        if engine.state.failed:
            return
        if self._best_pending or (every and engine.state.epoch % every == 0):
            self.save(engine)

    def after_fit(self, engine) -> None:
        status = engine.state.status
        # A failed step (or one an error cut short) is never saved: the last good checkpoint stays the latest. A run
        # failed only by an earlier end-of-run handler trained to its end: its weights are saved.
        if engine.train_loader is None or status == "interrupted" or engine.state.failed:
            return
        if status == "preempted" or self.config.at_end or self._best_pending:
            self.save(engine)

    def save(self, engine) -> Path | None:
        state = engine.state
        # Saved already, unless an evaluation ran since (the final one after the last step): then its results go in.
        position = (state.step, state.epoch, state.batch_in_epoch, state.last_eval_step)
        if position == self._saved_at:
            return None
        shared, per_rank, meta = capture(engine)
        # Ranked for keep_best only when these very weights were evaluated: a later save must not inherit the value
        # of an earlier evaluation (it would tie with the evaluated checkpoint, win as the newer, and evict it).
        evaluated = self.config.monitor is not None and state.last_eval_step == state.step
        metric = state.last_eval.get(self.config.monitor) if evaluated else None
        try:
            path = self.manager.save(
                f"step-{state.step:08d}", shared=shared, per_rank=per_rank, meta=meta, metric=metric
            )
        except CheckpointError as err:
            raise EngineError(f"saving a checkpoint failed: {err}") from err
        self._saved_at = position
        self._best_pending = False
        if engine.is_main_process:
            logger.info("checkpoint saved: %s", path)
        return path
