"""Training progress: a one-line bar on a terminal, plain periodic lines in log files (SLURM, nohup), main process
only. It reads the last *logged* loss and evaluation metric, never the live loss tensor, so it adds no host-device
synchronisation. On a terminal it reads the clock after every step, to redraw the bar on time; in a log file it
writes at logged records (log steps, evaluations), so no hook of it runs per step."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, Literal

from accelengine.callbacks.base import Callback

if TYPE_CHECKING:
    from accelengine.engine import Engine

# Metric names whose better direction is known. A name matches after its split (`val/`), whole or as a
# `_`-separated part (`word_error`, `top1_accuracy`, `f1_macro`).
LOWER_IS_BETTER = ("loss", "error", "err", "nll", "perplexity", "ppl", "mse", "mae", "rmse", "wer", "cer")
HIGHER_IS_BETTER = ("accuracy", "acc", "f1", "precision", "recall", "auc", "auroc", "auprc", "map", "ndcg", "bleu",
                    "rouge", "iou", "miou", "dice", "r2")  # fmt: skip


def _named(metric: str, names: tuple[str, ...]) -> bool:
    name = metric.rsplit("/", 1)[-1].lower()
    return any(name == w or name.startswith(f"{w}_") or name.endswith(f"_{w}") for w in names)


def lower_is_better(metric: str) -> bool:
    """Whether the name says smaller is better (what the progress line and the run summary display by)."""
    return _named(metric, LOWER_IS_BETTER)


def metric_mode(metric: str) -> Literal["min", "max"] | None:
    """`min` for a known lower-is-better name (`val/loss`, `val/error`, `val/perplexity`...), `max` for a known
    higher-is-better one (`val/accuracy`, `val/f1`...), None when the name does not say (or says both). What ranks
    checkpoints, stops early or picks a sweep's best asks for an explicit mode when this is None: ranked the wrong
    way, it would keep the worst."""
    lower, higher = _named(metric, LOWER_IS_BETTER), _named(metric, HIGHER_IS_BETTER)
    if lower == higher:
        return None
    return "min" if lower else "max"


def monitor_mode(monitor: str, mode: str | None, owner: str) -> Literal["min", "max"]:
    """`mode` when given, else the one `monitor`'s name says; ValueError when neither says (`owner` is what asks)."""
    if mode in ("min", "max"):
        return mode  # type: ignore[return-value]
    if mode is not None:
        raise ValueError(f"{owner}: mode must be `min` or `max`, got {mode!r}")
    known = metric_mode(monitor)
    if known is None:
        raise ValueError(
            f"{owner}: cannot tell whether a smaller or a larger `{monitor}` is better; give its mode: "
            '`mode = "min"` or `mode = "max"`'
        )
    return known


def headline_metric(results: dict[str, float]) -> str | None:
    """The metric to show when none is named: the first non-loss metric of the first evaluation set."""
    keys = list(results)
    return next((k for k in keys if not lower_is_better(k)), keys[0] if keys else None)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar(Callback):
    """Epoch/step, rate, ETA, the last logged training loss and the last evaluation metric.

    Args:
        every_s: when stdout is not a terminal, the least seconds between plain lines, written at logged records
            (log steps and evaluations: a run that logs rarely gets rarer lines); 0: a line every optimizer step.
        metric: the evaluation metric to show, e.g. `val/accuracy`; default the first non-loss one.
        refresh_s: seconds between redraws of the bar on a terminal.
        force_tty: draw the bar (True) or plain lines (False) whatever stdout is; default: ask stdout.
    """

    def __init__(
        self, every_s: float = 30.0, metric: str | None = None, refresh_s: float = 0.2, force_tty: bool | None = None
    ) -> None:
        super().__init__()
        if every_s < 0 or refresh_s < 0:
            raise ValueError(f"ProgressBar: every_s and refresh_s must be 0 or more, got {every_s}, {refresh_s}")
        self.every_s = every_s
        self.metric = metric
        self.refresh_s = refresh_s
        self.force_tty = force_tty
        self._active = False
        self._tty = False
        self._drawn = False
        self._next = 0.0
        self._t0 = 0.0
        self._step0 = 0
        self._total: int | None = None

    def before_fit(self, engine: Engine) -> None:
        self._active = engine.is_main_process and engine.train_loader is not None
        if not self._active:
            return
        self._tty = self._on_terminal()
        if self._tty:
            # Other console lines (a checkpoint saved, a warning) come through the `accelengine` logger: clear the
            # bar before each, so they do not start in the middle of it.
            for handler in logging.getLogger("accelengine").handlers:
                handler.addFilter(self._clear_filter)
        self._total = _total_steps(engine)
        self._t0 = time.perf_counter()
        self._step0 = engine.state.step
        self._next = self._t0 + (self.refresh_s if self._tty else self.every_s)

    def _on_terminal(self) -> bool:
        return self.force_tty if self.force_tty is not None else _isatty(sys.stdout)

    def idle_hooks(self, engine: Engine) -> tuple[str, ...]:
        # a bar, or a line every step, polls after each step; periodic lines in a log file come from `on_log`
        polls = self._on_terminal() or self.every_s == 0
        return () if polls and engine.is_main_process and engine.train_loader is not None else ("after_fit_step",)

    def after_fit_step(self, engine: Engine) -> None:  # a bar, or a line per step, on the main process (`idle_hooks`)
        now = time.perf_counter()
        if now >= self._next and engine.state.optimizer_stepped:
            self._next = now + (self.refresh_s if self._tty else self.every_s)
            self._emit(engine, now)

    def on_log(self, engine: Engine, record: dict[str, Any]) -> None:
        if not self._active:
            return
        if self._tty:
            # Console lines follow (this callback is registered before the console logger): clear the bar so they
            # start on a clean line; it is redrawn at the next refresh.
            self._clear()
        elif self.every_s:  # plain lines in a log file: at records, once `every_s` has passed
            now = time.perf_counter()
            if now >= self._next:
                self._next = now + self.every_s
                self._emit(engine, now)

    def _clear(self) -> None:
        if self._drawn:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
            self._drawn = False
            self._next = 0.0

    def _clear_filter(self, record: logging.LogRecord) -> bool:
        self._clear()
        return True  # a filter that lets everything through: it only clears the line first

    def after_fit(self, engine: Engine) -> None:
        if self._active:
            self._emit(engine, time.perf_counter(), final=True)
            self._active = False
            for handler in logging.getLogger("accelengine").handlers:
                handler.removeFilter(self._clear_filter)

    # ------------------------------------------------------------------------------------------------------------
    def line(self, engine: Engine, now: float) -> str:
        """The progress text: `epoch 2/10 step 150/600 25% 40.1 steps/s ETA 0:00:11 loss 0.31 val/accuracy 0.94`."""
        state, cfg = engine.state, engine.config
        total = self._total
        epochs = f"/{cfg.epochs}" if cfg.epochs is not None else ""
        done = state.step - self._step0
        elapsed = now - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        steps = f"step {state.step}/{total}" if total else f"step {state.step}"
        parts = [f"epoch {min(state.epoch + 1, cfg.epochs or state.epoch + 1)}{epochs}", steps]
        if self._tty and total:
            width = 20
            filled = int(width * min(state.step / total, 1.0))
            parts.append(f"[{'#' * filled}{'.' * (width - filled)}]")
        parts.append(f"{100 * state.step / total:.0f}%" if total else "")
        parts.append((f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}") + " steps/s" if rate else "")
        if rate and total and total > state.step:
            parts.append(f"ETA {format_duration((total - state.step) / rate)}")
        loss = state.last_train.get("train/loss")
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        metric = self.metric or headline_metric(state.last_eval)
        if metric and metric in state.last_eval:
            parts.append(f"{metric} {state.last_eval[metric]:.4g}")
        return " ".join(p for p in parts if p)

    def _emit(self, engine: Engine, now: float, final: bool = False) -> None:
        text = self.line(engine, now)
        if final:
            text += f" in {format_duration(now - self._t0)}"
        out = sys.stdout
        if self._tty:
            columns = shutil.get_terminal_size((100, 20)).columns  # a bar longer than the line would wrap
            out.write("\r\x1b[K" + (text + "\n" if final else text[: columns - 1]))
            self._drawn = not final
        else:
            out.write(text + "\n")
        out.flush()


def _total_steps(engine: Engine) -> int | None:
    try:
        return engine.total_steps
    except TypeError:  # epochs over a data set without a length: how many steps is not known in advance
        return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
