"""The typed recipe: one dataclass per section. The validator, the resolved recipe and the reference docs are all
derived from these classes, so they cannot drift apart. `doc` in each field's metadata is the reference text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from accelengine.recipe.components import ComponentSpec


def doc(text: str, **kw: Any) -> dict[str, Any]:
    return {"doc": text, **kw}


@dataclass
class LoaderSection:
    """`[data.<name>]`: one named data set. `train` is trained on; every other name is evaluated."""

    dataset: ComponentSpec | None = field(
        default=None, metadata=doc("component returning a torch `Dataset` or a HuggingFace `datasets.Dataset`")
    )
    batch_size: int | None = field(default=None, metadata=doc("per-process batch size; default `data.batch_size`"))
    shuffle: bool | None = field(default=None, metadata=doc("shuffle each epoch; default true for `train` only"))
    drop_last: bool = field(default=False, metadata=doc("drop the last incomplete batch"))
    num_workers: int | None = field(default=None, metadata=doc("loader worker processes; default `data.num_workers`"))


@dataclass
class DataSection:
    """`[data]`: settings shared by every loader, and one `[data.<name>]` table per data set."""

    batch_size: int = field(default=32, metadata=doc("default per-process batch size"))
    num_workers: int = field(default=0, metadata=doc("default loader worker processes"))
    pin_memory: bool = field(
        default=False, metadata=doc("pin host memory (with GPUs: batches then reach the device without a sync)")
    )
    input_key: str = field(default="input", metadata=doc("column holding the model input when batches are dicts"))
    target_key: str = field(default="label", metadata=doc("column holding the target when batches are dicts"))
    loaders: dict[str, LoaderSection] = field(
        default_factory=dict, metadata=doc("named data sets: every table inside `[data]`", flatten=True)
    )


@dataclass
class TrainerSection:
    """`[trainer]`: length of training, cadences and how Accelerate runs the step."""

    epochs: int | None = field(default=None, metadata=doc("train for this many epochs (exactly one of epochs/steps)"))
    steps: int | None = field(
        default=None, metadata=doc("train for this many optimizer steps (exactly one of epochs/steps)")
    )
    eval_every: int = field(default=1, metadata=doc("evaluate every N epochs or N steps (the unit of the length)"))
    log_every: int = field(default=10, metadata=doc("log training losses every N optimizer steps"))
    grad_accum: int | None = field(
        default=None, metadata=doc("micro-batches per optimizer step; unset: the launcher's value, else 1")
    )
    max_grad_norm: float | None = field(default=None, metadata=doc("clip the gradient norm to this value"))
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] | None = field(
        default=None, metadata=doc("unset: the launcher's value (`accelerate launch --mixed_precision`), else `no`")
    )
    device: Literal["auto", "cpu"] = field(
        default="auto", metadata=doc("`cpu` forces the CPU (and gloo for several processes); `auto` uses accelerators")
    )
    deterministic: bool = field(default=False, metadata=doc("ask torch for deterministic algorithms"))


@dataclass
class CheckpointSection:
    """`[checkpoint]`: when to save, what to keep (see the checkpoint docs)."""

    every_steps: int | None = field(default=None, metadata=doc("save every N optimizer steps"))
    every_epochs: int | None = field(default=None, metadata=doc("save every N epochs"))
    at_end: bool = field(default=True, metadata=doc("save when training ends"))
    keep_last: int | None = field(default=3, metadata=doc("keep the N newest checkpoints; 0 keeps all"))
    keep_best: int = field(default=1, metadata=doc("keep the K best by `monitor`"))
    monitor: str | None = field(default=None, metadata=doc("metric to rank checkpoints, e.g. `val/accuracy`"))
    mode: Literal["min", "max"] | None = field(
        default=None,
        metadata=doc(
            "whether a smaller (`min`) or larger (`max`) `monitor` is better; unset: what its name says (`loss`, "
            "`error`... min; `accuracy`, `f1`... max), required for other names"
        ),
    )
    init_from: str | None = field(
        default=None, metadata=doc("initialise model weights from a checkpoint dir or `.safetensors` file (fine-tune)")
    )
    signals: list[str] = field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"], metadata=doc("signals that checkpoint and exit (preemption)")
    )


@dataclass
class LogSection:
    """`[log]`: what the run reports while it trains and what it records (see `docs/callbacks.md`)."""

    trackers: list[str] | None = field(
        default=None,
        metadata=doc(
            "experiment trackers, through Accelerate's integrations: `tensorboard`, `wandb`, `mlflow`, `aim`, "
            "`comet_ml`, `clearml`, `dvclive`, `swanlab`, `trackio`; unset: `tensorboard` when it is installed; "
            "`[]`: none"
        ),
    )
    project: str | None = field(default=None, metadata=doc("tracker project name; default the recipe's `name`"))
    tracker_kwargs: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata=doc('arguments for each tracker\'s run, e.g. `wandb = {entity = "me", tags = ["ablation"]}`'),
    )
    progress: bool = field(
        default=True, metadata=doc("progress bar on a terminal; plain periodic lines when stdout is a file")
    )
    progress_every_s: float = field(
        default=30.0,
        metadata=doc(
            "least seconds between plain progress lines when stdout is not a terminal, written at logged records "
            "(0: a line every optimizer step)"
        ),
    )
    console: bool = field(default=True, metadata=doc("a console line (and `log.txt` line) per logged record"))
    param_table: bool = field(default=True, metadata=doc("print the parameter counts per top-level module at start"))
    summary: bool = field(default=True, metadata=doc("print the end-of-run summary (`summary.json` is always written)"))
    nan_guard: Literal["stop", "skip", "off"] = field(
        default="stop", metadata=doc("on a non-finite loss: `stop` the run (failed), `skip` the update, or `off`")
    )
    copy_code: list[str] = field(
        default_factory=list,
        metadata=doc(
            "globs of source files to snapshot into `RUN_DIR/code/`, relative to the recipe's directory, "
            'e.g. `["*.py"]`'
        ),
    )


@dataclass
class Recipe:
    """The whole recipe (top-level keys and sections)."""

    name: str = field(
        default="run",
        metadata=doc(
            "run name: letters, digits, `_`, `-` and `.` (a recipe file's default is its file name); the default "
            "output is `runs/<name>/<timestamp>`"
        ),
    )
    seed: int = field(default=0, metadata=doc("global seed, set before anything is built"))
    engine: ComponentSpec = field(
        default_factory=lambda: ComponentSpec("engine", {}, written_as_string=True),
        metadata=doc("the engine class: `engine` or a dotted path to a subclass (custom `compute_loss`/`predict`)"),
    )
    model: ComponentSpec | None = field(default=None, metadata=doc("component returning a `torch.nn.Module`"))
    loss: ComponentSpec | None = field(default=None, metadata=doc("loss component `loss(prediction, target)`"))
    optim: ComponentSpec | None = field(default=None, metadata=doc("optimizer; the engine passes the parameters"))
    scheduler: ComponentSpec | None = field(
        default=None, metadata=doc("LR scheduler; the engine passes the optimizer (and `total_steps` when accepted)")
    )
    metrics: dict[str, ComponentSpec] = field(
        default_factory=dict,
        metadata=doc(
            'evaluation metrics by name, e.g. `accuracy = "accuracy"`; the loss is evaluated as `loss` unless a '
            "metric takes that name"
        ),
    )
    callbacks: list[ComponentSpec] = field(default_factory=list, metadata=doc("`[[callbacks]]` tables"))
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)


# Arguments the engine supplies for each component field; they may not be written in the recipe.
RUNTIME_ARGS: dict[str, tuple[str, ...]] = {
    "optim": ("params",),
    "scheduler": ("optimizer", "total_steps"),
    "engine": (
        "model",
        "data",
        "loss",
        "optimizer",
        "scheduler",
        "metrics",
        "callbacks",
        "config",
        "data_config",
        "checkpoint_config",
        "log_config",
        "seed",
        "out_dir",
        "recipe",
        "resume_from",
    ),
}
