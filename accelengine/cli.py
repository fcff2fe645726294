"""The command line: `accelengine run|eval|validate|inspect|export|sweep|report|reference ...`.

Exit codes: 0 success; 1 the run failed; 2 a mistake in the recipe, the command line, the launch configuration or
a checkpoint (a message, never a traceback); 75 preempted (a checkpoint was written: run the same command again).
"""

from __future__ import annotations

import argparse
import sys

from accelengine.checkpoint import CheckpointError
from accelengine.errors import EngineError, RecipeError
from accelengine.preemption import EXIT_PREEMPTED

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the recipe TOML file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, parsed as TOML (e.g. --set optim.lr=3e-4); repeatable",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="accelengine", description="Train and evaluate PyTorch models from TOML recipes.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run a recipe (train, or evaluate only when it has no `train` data)")
    _add_recipe_args(p)
    p.add_argument("--out", help="run directory (default runs/<recipe name>/<timestamp>)")
    p.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto (default): continue from the newest complete checkpoint in --out, if any; never: refuse a "
        "non-empty --out; PATH: continue from that checkpoint",
    )
    p = sub.add_parser("eval", help="evaluate a checkpoint on every evaluation set of a recipe")
    _add_recipe_args(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run directory (its newest)")
    p.add_argument("--out", help="where to write the evaluation (default RUN_DIR/eval-<timestamp>)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights saved by the `ema` callback")
    p = sub.add_parser("inspect", help="print what a checkpoint holds, without loading a model")
    p.add_argument("path", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p = sub.add_parser("export", help="write a checkpoint's weights alone to a .safetensors file")
    p.add_argument("path", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    p = sub.add_parser("validate", help="check a recipe without running it")
    _add_recipe_args(p)
    p.add_argument("--print", action="store_true", help="print the resolved recipe")
    sub.add_parser("reference", help="print the reference of every recipe section and key")
    p = sub.add_parser("sweep", help="run every experiment of a session recipe (grid `key_ = [...]`, `[sweep]`)")
    _add_recipe_args(p)
    p.add_argument("--out", help="session directory (default runs/<name>/<timestamp>); an existing one is resumed")
    p.add_argument("--dry-run", action="store_true", help="print the experiments and write nothing")
    p.add_argument("--parallel", type=_positive, default=1, metavar="N", help="run N experiments at once")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local", help="where experiments run")
    p = sub.add_parser("report", help="plot a run's metrics (or several runs overlaid) and summarise them")
    p.add_argument("path", help="a run directory, or a directory with several runs below it (a sweep session)")
    p.add_argument("--out", help="where the PNG files go (default PATH/plots)")
    return ap


def cmd_run(args: argparse.Namespace) -> int:
    from accelengine.runner import run

    summary = run(args.recipe, args.overrides, args.out, resume=args.resume)
    return _exit_code(summary)


def _exit_code(summary: dict) -> int:
    if summary["status"] == "preempted":
        return EXIT_PREEMPTED
    return EXIT_OK if summary["status"] in ("completed", "stopped") else EXIT_FAILED


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from accelengine.runner import evaluate

    summary = evaluate(args.recipe, args.checkpoint, args.overrides, args.out, ema=args.ema)
    print(json.dumps(summary["final"], indent=2))
    return _exit_code(summary)


def cmd_inspect(args: argparse.Namespace) -> int:
    from accelengine.checkpoint import format_inspection, inspect_checkpoint
    from accelengine.restart import resolve_checkpoint

    print(format_inspection(inspect_checkpoint(resolve_checkpoint(args.path))))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from accelengine.runner import export_weights

    print(export_weights(args.path, args.out, ema=args.ema))
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from accelengine.recipe import dump_toml, load_recipe, recipe_to_dict

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print:
        print(dump_toml(recipe_to_dict(recipe)), end="")
    else:
        print(f"{args.recipe}: ok ({', '.join(recipe.data.loaders)}; model {recipe.model.target})")
    return EXIT_OK


def cmd_reference(args: argparse.Namespace) -> int:
    from accelengine.recipe.reference import reference_markdown

    print(reference_markdown(), end="")
    return EXIT_OK


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def cmd_sweep(args: argparse.Namespace) -> int:
    from accelengine.sweep import plan, run_session

    if args.dry_run:
        print(plan(args.recipe, args.out, args.overrides), end="")
        return EXIT_OK
    result = run_session(
        args.recipe, args.out, parallel=args.parallel, launcher=args.launcher, overrides=args.overrides
    )
    return EXIT_OK if result.ok else EXIT_FAILED


def cmd_report(args: argparse.Namespace) -> int:
    from accelengine.report import report

    files, lines = report(args.path, args.out)
    for line in lines:
        print(line)
    print(f"{len(files)} plots in {files[0].parent}" if files else "nothing to plot")
    return EXIT_OK


COMMANDS = {
    "run": cmd_run,
    "eval": cmd_eval,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "validate": cmd_validate,
    "reference": cmd_reference,
    "sweep": cmd_sweep,
    "report": cmd_report,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (RecipeError, EngineError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
