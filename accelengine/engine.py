"""The engine: one step loop on Accelerate, with hooks dispatched in one place.

    fit():
        before_fit
        [before_task]                                   (reserved for task loops: continual learning)
        until the length (epochs or steps) is reached or a callback requests a stop:
            before_fit_epoch
            for each batch:
                before_fit_step
                fit_step                    forward, backward; on the last micro-batch of an accumulation: clip,
                                            before_optimizer_step, optimizer and scheduler step
                every `log_every` steps: log training losses
                steps mode, every `eval_every` steps: evaluate
                after_fit_step              the step is complete, its logs and evaluation included
            epochs mode, every `eval_every` epochs: evaluate
            after_fit_epoch
        a last evaluation if the last step was not evaluated
        [after_task]                                    (not when preempted: the task goes on after the resume)
        after_fit

    evaluate():
        before_eval
        for each evaluation set, for each batch: before_eval_step, eval_step, after_eval_step
        after_eval                                      (metrics over the whole set, on `state.last_eval`)

Each hook is first the engine's own method (override it in a subclass), then every callback that implements it,
in registration order: the built-in set (see `callbacks/defaults.py`, configured by `[log]` / `LogConfig`), then the
recipe's `[[callbacks]]` or the `callbacks=` given in Python, then the checkpointer, then `RunSummary`, which writes
`summary.json` last.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, GradientAccumulationPlugin, set_seed
from torch import nn
from torch.utils.data import DataLoader

from accelengine.callbacks.base import EPOCH_HOOKS, HOOKS, STEP_HOOKS, Callback, overrides
from accelengine.callbacks.checkpointer import Checkpointer
from accelengine.callbacks.defaults import default_callbacks
from accelengine.callbacks.trackers import accelerator_kwargs
from accelengine.data import make_loader, set_epoch, split_batch
from accelengine.errors import EngineError
from accelengine.loss_window import FOLD, LossWindow
from accelengine.metrics import Accuracy, MeanLoss, as_metric, to_float
from accelengine.preemption import EarlySignals, Preempted, PreemptionHandler
from accelengine.recipe.schema import CheckpointSection, DataSection, LogSection, TrainerSection
from accelengine.rundir import close_run_log, setup_logging
from accelengine.state import State
from accelengine.stepping import OptimizerDriver

logger = logging.getLogger("accelengine")

TrainerConfig = TrainerSection  # the Python API's name for the `[trainer]` section
DataConfig = DataSection
CheckpointConfig = CheckpointSection
LogConfig = LogSection
NO_LOSS = "no loss: give a `loss` component, or subclass Engine and override `compute_loss`"


class Engine:
    """Trains and evaluates a model on named data sets.

    Python use, without any recipe::

        engine = Engine(
            model=MLP(64, 10),
            data={"train": train_set, "val": val_set},     # torch or HF datasets, or DataLoaders
            loss=torch.nn.CrossEntropyLoss(),
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
            metrics={"accuracy": Accuracy()},
            config=TrainerConfig(epochs=5),
        )
        summary = engine.fit()   # {"status": "completed", "final": {"val/accuracy": ...}, ...}

    Subclass and override `compute_loss(batch)` (a tensor, a list or a dict of tensors: each term is logged, their
    sum is optimized and logged as `loss`, a name no term of several may take) and `predict(batch)` for anything
    beyond `loss(model(x), y)`.

    Evaluation reports every metric and, when there is a `loss`, its mean as `<split>/loss`; a metric named `loss`
    takes that name's place (to evaluate with another loss than the one trained).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Mapping[str, Any],
        *,
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Any | Callable[..., Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        callbacks: Iterable[Callback] = (),
        config: TrainerSection | None = None,
        data_config: DataSection | None = None,
        checkpoint_config: CheckpointSection | None = None,
        log_config: LogSection | None = None,
        seed: int = 0,
        out_dir: str | Path | None = None,
        recipe: dict[str, Any] | None = None,
        resume_from: str | Path | None = None,
    ) -> None:
        self.config = config or TrainerSection()
        self.data_config = data_config or DataSection()
        self.checkpoint_config = checkpoint_config or CheckpointSection()
        self.log_config = log_config or LogSection()
        self.seed = seed
        self.recipe = recipe
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state = State()
        # The seed goes in before the Accelerator exists: its seedable sampler and every process start alike.
        if self.config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        set_seed(seed, deterministic=self.config.deterministic)
        self.accelerator = self._make_accelerator()
        self._is_main = self.accelerator.is_main_process
        self._distributed = self.accelerator.num_processes > 1
        self.loss_fn = loss
        self.model = model
        self._optimizer_arg, self._scheduler_arg = optimizer, scheduler
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.loaders: dict[str, Any] = dict(data)
        self.metrics = {name: as_metric(m) for name, m in (metrics or {}).items()}
        if loss is not None and "loss" not in self.metrics:
            self.metrics = {"loss": MeanLoss(loss), **self.metrics}
        self.resume_from = Path(resume_from) if resume_from is not None else None
        # Built-ins first, user callbacks next; the checkpointer last, so a checkpoint holds what the others did.
        first, callbacks, last = default_callbacks(self.log_config, callbacks)  # a given built-in takes its place
        self.preemption = PreemptionHandler(self.checkpoint_config.signals)  # released last, in `fit`
        self.callbacks: list[Callback] = [*first, self.preemption, *callbacks]
        if self.out_dir is not None:
            self.callbacks.append(Checkpointer(self.checkpoint_config))
        self.callbacks += last  # RunSummary: summary.json holds what every callback added, the checkpointer's too
        self.summary_extras: dict[str, Any] = {}  # callbacks add to the summary here (params, best metric, ...)
        self.code_root: Path | None = None  # where `log.copy_code` globs start; recipe runs: the recipe's folder
        self._log_next: dict[str, Any] = {}
        self._hooks: dict[str, Callable[..., None]] = {}  # what each hook runs, resolved once (`_bind_hooks`)
        self._log_handlers: list[Callable[[Engine, dict[str, Any]], None]] = []
        self._nonfinite_handlers: list[Callable[[Engine, float], None]] = []
        self.loss_window = LossWindow()  # training losses since the last log record
        self.losses_on_host = False  # see `_read_losses_on_host`
        self.epoch_start_rng: dict[str, Any] | None = None
        self._prepared = False
        self.start_time = 0.0
        self._first_step = 0

    # ----------------------------------------------------------------------------------------------- set-up --
    def _make_accelerator(self) -> Accelerator:
        cfg = self.config
        kwargs: dict[str, Any] = {
            "cpu": cfg.device == "cpu",
            # The recipe wins when it sets a value; unset values come from `accelerate launch` flags or config.
            "mixed_precision": cfg.mixed_precision,
            # We never hand the scheduler to Accelerate, so it steps exactly once per optimizer step.
            "step_scheduler_with_optimizer": False,
            # Pinned batches are copied to the device without waiting for the copy (no host-device synchronisation).
            "dataloader_config": DataLoaderConfiguration(
                use_seedable_sampler=True, data_seed=self.seed, non_blocking=self.data_config.pin_memory
            ),
        }
        if cfg.grad_accum is not None:
            # A plugin, because a plain `gradient_accumulation_steps=` loses to the launcher's environment variable.
            kwargs["gradient_accumulation_plugin"] = GradientAccumulationPlugin(num_steps=cfg.grad_accum)
        kwargs.update(accelerator_kwargs(self.log_config, self.out_dir))  # trackers: `log_with`, their folder
        try:
            accelerator = Accelerator(**kwargs)
        except (ValueError, RuntimeError) as err:
            raise EngineError(f"Accelerate refused this configuration: {err}") from err
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and accelerator.num_processes == 1:
            raise EngineError(
                f"{world} processes were launched (WORLD_SIZE={world}) but each one believes it is rank 0 of 1. "
                'On a machine without GPUs set `trainer.device = "cpu"` in the recipe (or --set trainer.device=cpu) '
                "so the processes form a gloo group; with GPUs, check that every process sees a device."
            )
        return accelerator

    @property
    def is_main_process(self) -> bool:
        return self._is_main  # Accelerate rebuilds its state object on every `is_main_process` call

    @property
    def train_loader(self) -> Any:
        return self.loaders.get("train")

    @property
    def eval_loaders(self) -> dict[str, Any]:
        return {k: v for k, v in self.loaders.items() if k != "train"}

    def _loader_for(self, name: str, dataset: Any) -> Any:
        dc = self.data_config
        section = dc.loaders.get(name)
        shuffle = section.shuffle if section and section.shuffle is not None else name == "train"
        return make_loader(
            dataset,
            batch_size=(section.batch_size if section and section.batch_size else dc.batch_size),
            shuffle=shuffle,
            drop_last=section.drop_last if section else False,
            num_workers=section.num_workers if section and section.num_workers is not None else dc.num_workers,
            pin_memory=dc.pin_memory,
            seed=self.seed,
        )

    def setup(self) -> None:
        """Build loaders, optimizer and scheduler and hand them to Accelerate. Called by `fit`/`evaluate`; runs once."""
        if self._prepared:
            return
        acc = self.accelerator
        names = list(self.loaders)
        loaders = [self._loader_for(n, self.loaders[n]) for n in names]
        training = "train" in self.loaders
        if self.checkpoint_config.init_from and self.resume_from is None:
            from accelengine.restart import load_weights

            load_weights(self, self.checkpoint_config.init_from)  # before prepare: every rank starts alike
        if training:
            if self._optimizer_arg is None:
                raise EngineError("a `train` data set needs an optimizer")
            if self.loss_fn is None and not (_overridden(self, "compute_loss") or _overridden(self, "fit_step")):
                raise EngineError(NO_LOSS)  # before anything runs, not at the first step
            if self.config.epochs is None and self.config.steps is None:
                raise EngineError("set the length of training: TrainerConfig(epochs=...) or TrainerConfig(steps=...)")
        # On the CPU the batches are already where they go: skip the per-batch walk that would move them.
        on_cpu = acc.device.type == "cpu"
        # One CPU process without accumulation: Accelerate's loader wrapper would neither shard, move, nor mark the
        # end of an accumulation, only add a generator per batch; the engine then iterates the loader it built.
        direct = on_cpu and acc.distributed_type == DistributedType.NO and acc.gradient_accumulation_steps == 1
        loaders = [
            dl
            if direct and name == "train" and not isinstance(self.loaders[name], DataLoader)
            else acc.prepare_data_loader(dl, device_placement=not on_cpu)
            for name, dl in zip(names, loaders, strict=True)
        ]
        self.loaders = dict(zip(names, loaders, strict=True))  # first: `total_steps` counts the prepared loader
        if training:
            opt = self._optimizer_arg
            if not isinstance(opt, torch.optim.Optimizer):
                opt = opt(self.model.parameters())
            # The scheduler is made before `prepare`: with a gradient scaler Accelerate's optimizer puts back, after
            # every step, the `step` it saw at `prepare`, which must then be the one the scheduler tracks.
            sched = self._scheduler_arg
            if callable(sched) and not hasattr(sched, "step"):
                sched = _call_with_total_steps(sched, opt, self.total_steps)
            self.scheduler = sched
            self.model, self.optimizer = acc.prepare(self.model, opt)
        else:
            self.model = acc.prepare(self.model)
        for m in self.metrics.values():
            if isinstance(m, nn.Module):
                m.to(acc.device)
        if self.optimizer is not None:
            self.driver = OptimizerDriver(acc, self.optimizer)
        self._read_losses_on_host(on_cpu and not self._distributed)
        self._bind_hooks()
        self._prepared = True
        if self._distributed:
            from accelengine.restart import agree_on_resume

            self.resume_from = agree_on_resume(acc, self.resume_from)
        if self.resume_from is not None:
            from accelengine.restart import restore

            restore(self, self.resume_from)

    def _read_losses_on_host(self, on_host: bool) -> None:
        """One CPU process reads each training loss as it is made (a float: nothing to synchronise with, no tensor
        kept alive; see `loss_window`); elsewhere the losses stay on the device until a log step reads them back."""
        self.losses_on_host = self.loss_window.on_host = on_host
        # Between two records the window holds `log_every` steps of micro-batches: only a longer one needs folding.
        longest = self.config.log_every * self.accelerator.gradient_accumulation_steps
        self._keep_loss = self.loss_window.loss.append if longest <= FOLD else self.loss_window.append

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch on this process (Accelerate syncs at the end of each epoch)."""
        return math.ceil(len(self.train_loader) / self.accelerator.gradient_accumulation_steps)

    @property
    def total_steps(self) -> int:
        if self.config.steps is not None:
            return self.config.steps
        return self.config.epochs * self.steps_per_epoch

    def _bind_hooks(self) -> None:
        """The one place hooks are dispatched from: resolve, once, what each hook runs — the engine's own method
        (when a subclass overrides it; `fit_step` and `eval_step` always), then each callback that implements it, in
        registration order, with its cadence applied here. A hook is then a single call (to a no-op, to its only
        handler, or to a loop over several): nothing is looked up or tested per step."""
        idle = {id(cb): set(cb.idle_hooks(self)) for cb in self.callbacks}
        accumulating = getattr(self, "driver", None) is not None and self.driver.accumulating
        for hook in HOOKS:
            own = getattr(self, hook) if hook in _ENGINE_WORK or _overridden(self, hook) else None
            if hook == "fit_step" and not accumulating and not _overridden(self, hook):
                own = self._micro_batch  # what `fit_step` does without accumulation, one call nearer
            handlers = []
            for cb in self.callbacks:
                if not overrides(cb, hook) or hook in idle[id(cb)]:
                    continue
                fn = getattr(cb, hook)
                if cb.every_n_steps and hook in STEP_HOOKS:
                    fn = _every_n_steps(fn, cb.every_n_steps, ahead=hook == "before_optimizer_step")
                elif cb.every_n_epochs and hook in EPOCH_HOOKS:
                    fn = _every_n_epochs(fn, cb.every_n_epochs)
                elif getattr(fn, "__self__", None) is cb:  # a method: call its function, no bound method per call
                    handlers.append(partial(fn.__func__, cb, self))
                    continue
                handlers.append(partial(fn, self))
            if hook == "after_fit":  # the run's last hook: one failing handler (a full disk at the last save) must
                # not cost the others theirs, the run summary's among them, which then records the run as failed
                self._hooks[hook] = partial(_each_despite_errors, self.state, [own, *handlers] if own else handlers)
            else:
                self._hooks[hook] = _dispatcher(own, handlers)
        before_update = self._hooks["before_optimizer_step"]
        if self.config.max_grad_norm is not None:
            before_update = partial(self._clip_then, before_update)
        self._before_update = before_update  # what runs between backward and the optimizer step
        custom_loss = self.loss_fn is None or _overridden(self, "compute_loss") or _overridden(self, "split_batch")
        self._loss_of = self.compute_loss if custom_loss else _default_loss(self)
        # events (called with a value): the callbacks that implement them, in order
        self._log_handlers = [cb.on_log for cb in self.callbacks if overrides(cb, "on_log")]
        self._nonfinite_handlers = [cb.on_nonfinite_loss for cb in self.callbacks if overrides(cb, "on_nonfinite_loss")]

    def _run_hook(self, hook: str, *args: Any) -> None:
        """Run a hook: the engine's own method (given `args`), then the callbacks (given the engine)."""
        self._hooks[hook](*args)

    # ------------------------------------------------------------------------------------------------- loop --
    def fit(self) -> dict[str, Any]:
        """Train (or only evaluate, when there is no `train` set). Returns the run summary."""
        # The run's log opens first: what `setup` reports (the checkpoint it resumed from, the weights it loaded, a
        # rank that follows rank 0's checkpoint) belongs in it, on the console and in `log.txt`.
        setup_logging(self.out_dir, self._is_main, self.accelerator.process_index)
        try:
            # a preemption signal while setting up (restoring a large checkpoint) stops the run before its first step
            with EarlySignals(self.preemption.signals) as early:
                early.hand_to(self.preemption)
                self.setup()
        except BaseException:
            close_run_log()
            raise
        self.start_time = time.time()
        self._first_step = self.state.step  # a resume restored it: the speed counts the steps this attempt makes
        self.state.status = "running"
        try:
            self._run_hook("before_fit")
            if self.train_loader is None:
                self.evaluate()
            else:
                self._run_hook("before_task")
                self._train()
                if self.eval_loaders and self.state.last_eval_step != self.state.step and not self.state.preempted:
                    self.evaluate()
                if not self.state.preempted:  # the task goes on after the resume, and ends there
                    self._run_hook("after_task")
            self.state.status = "failed" if self.state.failed else "stopped" if self.state.should_stop else "completed"
            if self.state.preempted:
                self.state.status = "preempted"
        except Preempted:
            self.state.status = "preempted"
        except BaseException as err:
            self.state.status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            self.state.failed = self.state.status == "failed"  # mid-step: no end-of-run checkpoint of these weights
            self.state.stop_reason = self.state.stop_reason or f"{type(err).__name__}: {err}"
            raise
        finally:
            try:
                self._run_hook("after_fit")  # the checkpointer's end-of-run or preemption save among them
            finally:
                self.preemption.release(self)
                close_run_log()  # the run's `log.txt` is complete
        return self.summary()

    def _train(self) -> None:
        state, cfg = self.state, self.config
        by_steps = cfg.steps is not None
        evaluating = bool(self.eval_loaders)
        if state.pending_eval:  # resumed from a preemption during an evaluation: redo it, then end that step/epoch
            self.evaluate()
            state.optimizer_stepped = True  # that step was complete (not saved: it is per-batch scratch)
            self._run_hook("after_fit_step" if state.pending_eval == "step" else "after_fit_epoch")
            state.pending_eval = ""
        before_step, step, after_step = (self._hooks[h] for h in ("before_fit_step", "fit_step", "after_fit_step"))
        log_every = cfg.log_every
        eval_every = cfg.eval_every if by_steps and evaluating else 0  # steps mode; epochs mode evaluates below
        last_step = cfg.steps if by_steps else sys.maxsize
        while not self._finished():
            self._run_hook("before_fit_epoch")
            for batch in self._epoch_batches():
                state.batch = batch
                state.batch_in_epoch += 1
                before_step()
                step(batch)
                if not state.optimizer_stepped:  # a micro-batch within a gradient accumulation
                    after_step()
                    continue
                done = state.step
                if done % log_every == 0:
                    self._log_train()
                elif self._log_next:  # a monitor's values at its own cadence, between log steps
                    self._log_monitors()
                if eval_every and done % eval_every == 0:
                    self._evaluate_within("step")
                after_step()  # the step is complete: a checkpoint here holds all of it
                if state.should_stop or done >= last_step:
                    break
            else:  # the epoch ran to its end
                state.epoch += 1
                state.batch_in_epoch = 0
                if not by_steps and evaluating and state.epoch % cfg.eval_every == 0:
                    self._evaluate_within("epoch")
                self._run_hook("after_fit_epoch")
                continue
            break
        if len(self.loss_window) and not state.preempted:  # a preempted run continues this window after its resume
            self._log_train()

    def _evaluate_within(self, unit: str) -> None:
        self.state.pending_eval = unit
        self.evaluate()
        self.state.pending_eval = ""

    def _finished(self) -> bool:
        return self.state.should_stop or self.trained_full_length

    @property
    def trained_full_length(self) -> bool:
        """True once training has run all its steps (or epochs): the evaluation after the last one ends the run."""
        cfg, state = self.config, self.state
        return state.step >= cfg.steps if cfg.steps is not None else state.epoch >= cfg.epochs

    def _epoch_batches(self) -> Iterable[Any]:
        from accelengine.restart import LOADER_RNG, iterate_from_rng, rng_state

        loader = self.train_loader
        set_epoch(loader, self.state.epoch)  # the shuffling order is a function of (seed, epoch)
        if not self.state.batch_in_epoch:
            # The iterator draws its seeds from the global RNG when it starts: remember that state (once per epoch)
            # so that a resume in the middle of this epoch can start its iterator exactly alike.
            self.epoch_start_rng = rng_state(LOADER_RNG)
            return loader
        # resuming mid-epoch: skip by index, no batch is loaded
        skipped = self.accelerator.skip_first_batches(loader, self.state.batch_in_epoch)
        return iterate_from_rng(skipped, self.epoch_start_rng)

    # ------------------------------------------------------------------------------------------------- step --
    def fit_step(self, batch: Any) -> None:
        """Forward, backward; on the last micro-batch of an accumulation: clip, optimizer and scheduler step.

        Sets `state.loss` (this micro-batch's total loss, detached; on one CPU process also `state.loss_value`, its
        float), `state.losses` (what `compute_loss` returned) and `state.optimizer_stepped` before
        `before_optimizer_step`, and keeps the loss terms for the next log record. Without accumulation the engine
        runs `_micro_batch` directly (one call less per step) unless a subclass overrides this method."""
        if self.driver.accumulating:  # Accelerate says which micro-batch ends a step, and skips DDP's sync before it
            with self.accelerator.accumulate(self.model):
                self._micro_batch(batch, self.accelerator.sync_gradients)
        else:
            self._micro_batch(batch, True)

    def _micro_batch(self, batch: Any, ends_step: bool = True) -> None:
        state, driver = self.state, self.driver
        losses = self._loss_of(batch)  # `compute_loss`, or without overrides the same computation, bound at setup
        if isinstance(losses, torch.Tensor):
            loss, terms = losses, None
        else:  # several terms: their sum is optimised, each is logged
            loss, terms = _total_and_terms(losses)
        if self.losses_on_host:  # one CPU process: read now, as a float (no sync there; nothing kept: `loss_window`)
            state.loss_value = entry = loss.item()
            state._loss = loss  # `state.loss` detaches it if a callback reads it
            if entry - entry:  # NaN or +-inf (a finite value gives 0.0): told here, no callback polls every step
                self._nonfinite_loss(entry)
        else:
            state._loss = entry = loss.detach()  # kept until the log step: not the graph
        state.losses, state.optimizer_stepped = losses, ends_step
        driver.backward(loss)
        if ends_step:
            self._before_update()  # clipping (when set), then before_optimizer_step
            driver.step()
            if self.scheduler is not None and not driver.step_was_skipped():
                self.scheduler.step()
            driver.zero_grad()
            state.step += 1
        if terms is None:  # one term: its reference, or on the host its value, is kept (see `loss_window`)
            self._keep_loss(entry)
        else:
            self.loss_window.add(terms)

    def _nonfinite_loss(self, value: float) -> None:
        for fn in self._nonfinite_handlers:
            fn(self, value)

    def _clip_then(self, before_optimizer_step: Callable[[], None]) -> None:
        self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        before_optimizer_step()

    def compute_loss(self, batch: Any) -> torch.Tensor | list[torch.Tensor] | dict[str, torch.Tensor]:
        """The training objective. Default: `loss(model(inputs), target)`. Override for anything else."""
        if self.loss_fn is None:  # checked in `setup` too; here for a direct call
            raise EngineError(NO_LOSS)
        inputs, target = self.split_batch(batch)
        return self.loss_fn(self.model(inputs), target)

    def predict(self, batch: Any) -> Any:
        """What evaluation metrics compare with the target. Default: `model(inputs)`."""
        inputs, _ = self.split_batch(batch)
        return self.model(inputs)

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        """(inputs, target) of a batch; see `data.split_batch`."""
        if type(batch) in _PAIR_TYPES and len(batch) == 2:  # the common `(x, y)`, without a further call
            return batch[0], batch[1]
        return split_batch(batch, self.data_config.input_key, self.data_config.target_key)

    def _log_monitors(self) -> None:
        """Values monitors handed in (`log_next`) at a step that is not a log step: a record of their own, stamped
        with the step they were measured at (device values are read back here: the monitor's cadence asked for it)."""
        values, self._log_next = self._log_next, {}
        self.log({k: to_float(v) for k, v in values.items()})

    def _log_train(self) -> None:
        extra, self._log_next = self._log_next, {}
        tensors = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
        if self.losses_on_host:  # one CPU process: the values were read as they were made
            names, values = self.loss_window.take_floats()
            values += [t.item() for t in tensors.values()]
        else:
            names, values = self._read_back(tensors)
        record = dict(zip([f"train/{n}" for n in names] + list(tensors), values, strict=True))
        if self.optimizer is not None:
            record["train/lr"] = self.optimizer.param_groups[0]["lr"]
        record.update({k: v for k, v in extra.items() if k not in tensors})
        self.state.last_train = record
        self.log(record)

    def _read_back(self, tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[float]]:
        """The window's mean losses and the monitors' device values (a gradient norm), averaged over processes and
        read back together: the one host-device synchronisation of a log step."""
        names, means = self.loss_window.take()
        parts = [] if means is None else [means]
        if tensors:
            device = means.device if means is not None else self.accelerator.device
            parts.append(torch.stack([t.detach().float().reshape(()).to(device) for t in tensors.values()]))
        if not parts:
            return names, []
        values = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self._distributed:
            values = self.accelerator.reduce(values, reduction="mean")
        return names, values.tolist()

    # ------------------------------------------------------------------------------------------------- eval --
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Evaluate every non-train data set; returns `{"<set>/<metric>": value}` (also on `state.last_eval`)."""
        self.setup()
        from accelengine.restart import rng_state, set_rng_state

        state = self.state
        # a preemption may cut this evaluation short: the checkpoint must then hold the random state from before it
        rng_before = rng_state() if state.pending_eval else None
        was_training = self.model.training
        results: dict[str, float] = {}
        try:
            self._run_hook("before_eval")
            self.model.eval()
            for name, loader in self.eval_loaders.items():
                state.eval_split = name
                for metric in self.metrics.values():
                    metric.reset()
                for batch in loader:
                    state.batch = batch
                    self._run_hook("before_eval_step")
                    self._run_hook("eval_step", batch)
                    self._run_hook("after_eval_step")
                for metric_name, metric in self.metrics.items():
                    value = metric.compute()
                    if isinstance(value, Mapping):
                        results.update({f"{name}/{k}": to_float(v) for k, v in value.items()})
                    else:
                        results[f"{name}/{metric_name}"] = to_float(value)
        except Preempted:
            if rng_before is not None:
                set_rng_state(rng_before)
            raise
        finally:
            self.model.train(was_training)
            state.eval_split = ""
        state.last_eval = results
        state.last_eval_step = state.step
        if results:
            self.log(results)
        self._run_hook("after_eval")
        return results

    def eval_step(self, batch: Any) -> None:
        """Predict, gather across processes (duplicates of the last uneven batch dropped), update the metrics."""
        preds = self.predict(batch)
        _, target = self.split_batch(batch)
        preds, target = self.accelerator.gather_for_metrics((preds, target))
        for metric in self.metrics.values():
            metric.update(preds, target)

    # -------------------------------------------------------------------------------------- hooks (no-ops) --
    def before_fit(self) -> None: ...
    def before_task(self) -> None: ...
    def before_fit_epoch(self) -> None: ...
    def before_fit_step(self) -> None: ...
    def before_optimizer_step(self) -> None: ...
    def after_fit_step(self) -> None: ...
    def after_fit_epoch(self) -> None: ...
    def before_eval(self) -> None: ...
    def before_eval_step(self) -> None: ...
    def after_eval_step(self) -> None: ...
    def after_eval(self) -> None: ...
    def after_task(self) -> None: ...
    def after_fit(self) -> None: ...

    # ---------------------------------------------------------------------------------------------- output --
    def log_next(self, values: Mapping[str, float | torch.Tensor]) -> None:
        """Add values to this step's record (monitors call this in `fit_step`, before the step's record is made). At a
        log step they join the training record, device tensors read back with the losses in the log step's one
        synchronisation; at any other step they are logged as a record of their own, stamped with this step."""
        self._log_next.update(values)

    def log(self, values: Mapping[str, float]) -> None:
        """Send a record (`{"split/name": value}`) to every logging callback, stamped with step and epoch."""
        record = {"step": self.state.step, "epoch": self.state.epoch, **values}
        self.state.log_count += 1
        for fn in self._log_handlers:
            fn(self, record)

    def summary(self) -> dict[str, Any]:
        state = self.state
        wall = time.time() - self.start_time if self.start_time else 0.0
        return {
            "status": state.status,
            "stop_reason": state.stop_reason,
            "steps": state.step,
            "epochs": state.epoch,
            "wall_time_s": round(wall, 3),
            "steps_per_s": round(done / wall, 3) if wall and (done := state.step - self._first_step) > 0 else None,
            "seed": self.seed,
            "world_size": self.accelerator.num_processes,
            "final": dict(state.last_eval),
            "last_train": dict(state.last_train),
            **self.summary_extras,
        }

    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)


def _total_and_terms(losses: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """For `compute_loss` returning several terms: the loss to optimise (their sum) and what a training record
    shows, `loss` (that total) with each named term beside it."""
    if isinstance(losses, Mapping):
        terms = dict(losses)
    elif isinstance(losses, (list, tuple)):
        terms = {f"loss_{i}": v for i, v in enumerate(losses)}
    else:
        kind = type(losses).__name__
        raise EngineError(f"compute_loss must return a tensor, a list or a dict of tensors, not {kind}")
    if not terms:
        raise EngineError("compute_loss returned no loss terms")
    if "loss" in terms and len(terms) > 1:  # a total and its parts, as other trainers return, would count twice
        others = ", ".join(f"`{name}`" for name in terms if name != "loss")
        raise EngineError(
            f"compute_loss returned a term named `loss` beside {others}: the engine optimizes the sum of the terms "
            "and logs it as `loss`; return the terms alone (their sum is what is optimized), or the total alone"
        )
    total = sum(terms.values())
    return total, (terms if list(terms) == ["loss"] else {"loss": total, **terms})  # type: ignore[return-value]


# Hooks whose engine method is the work itself (always run); the engine's other hook methods are no-ops to override.
_ENGINE_WORK = frozenset({"fit_step", "eval_step"})
_PAIR_TYPES = (tuple, list)


def _default_loss(engine: Engine) -> Callable[[Any], torch.Tensor]:
    """What `Engine.compute_loss` computes, with the model, the loss and `split_batch` looked up once: a `(x, y)`
    batch goes straight to the model, with no call to `compute_loss` and `split_batch` in between (two frames and
    about 45 bytecodes fewer per step, of the engine's roughly 260 on top of a bare loop)."""
    model, loss_fn, split = engine.model, engine.loss_fn, engine.split_batch

    def loss_of(batch: Any) -> torch.Tensor:
        if type(batch) in _PAIR_TYPES and len(batch) == 2:
            return loss_fn(model(batch[0]), batch[1])
        inputs, target = split(batch)
        return loss_fn(model(inputs), target)

    return loss_of


def _overridden(engine: Engine, hook: str) -> bool:
    return getattr(type(engine), hook) is not getattr(Engine, hook)


def _nothing(*args: Any) -> None:
    pass


def _dispatcher(own: Callable[..., None] | None, handlers: list[Callable[[], None]]) -> Callable[..., None]:
    """One callable for a hook: the engine's method (given the hook's arguments), then the handlers. Only hooks the
    engine always runs take arguments (`fit_step`, `eval_step`: the batch), so the others get none. One or two
    handlers are called without a loop (a per-step hook usually has one or two)."""
    if own is None:
        if not handlers:
            return _nothing
        if len(handlers) == 1:
            return handlers[0]
        if len(handlers) == 2:
            first, second = handlers

            def both() -> None:
                first()
                second()

            return both
        return partial(_call_each, handlers)
    if not handlers:
        return own
    if len(handlers) == 1:
        (handler,) = handlers

        def own_then_handler(*args: Any) -> None:
            own(*args)
            handler()

        return own_then_handler

    def run(*args: Any) -> None:
        own(*args)
        for fn in handlers:
            fn()

    return run


def _call_each(handlers: list[Callable[[], None]]) -> None:
    for fn in handlers:
        fn()


def _each_despite_errors(state: State, handlers: list[Callable[[], None]]) -> None:
    """Run every handler; the first error marks the run's status failed (for the handlers after it: the summary) and
    is raised at the end."""
    first: Exception | None = None
    for fn in handlers:
        try:
            fn()
        except Exception as err:
            if first is None:
                first = err
                # `failed` stays as it was: training itself did not fail, so the end-of-run checkpoint is still saved
                state.status, state.stop_reason = "failed", f"{type(err).__name__}: {err}"
    if first is not None:
        raise first


def _call_with_total_steps(factory: Callable[..., Any], optimizer: Any, total_steps: int) -> Any:
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    if "total_steps" in params:
        return factory(optimizer, total_steps=total_steps)
    return factory(optimizer)


def _every_n_steps(fn: Callable[[Engine], None], n: int, ahead: bool) -> Callable[[Engine], None]:
    # before the optimizer step, `state.step` does not count the step being made yet
    offset = 1 if ahead else 0

    def due(engine: Engine) -> None:
        if engine.state.optimizer_stepped and (engine.state.step + offset) % n == 0:
            fn(engine)

    return due


def _every_n_epochs(fn: Callable[[Engine], None], n: int) -> Callable[[Engine], None]:
    def due(engine: Engine) -> None:
        # before_fit_epoch sees the epochs done so far; after_fit_epoch the count including this one
        if engine.state.epoch % n == 0:
            fn(engine)

    return due


__all__ = ["Accuracy", "CheckpointConfig", "DataConfig", "Engine", "LogConfig", "TrainerConfig"]
