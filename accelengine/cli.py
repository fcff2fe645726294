"""The command line: `accelengine run|validate|reference ...`. Exit codes: 0 success, 1 the run failed,
2 a mistake in the recipe, the command line or the launch configuration (a message, never a traceback)."""

from __future__ import annotations

import argparse
import sys

from accelengine.errors import EngineError, RecipeError

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
    p = sub.add_parser("validate", help="check a recipe without running it")
    _add_recipe_args(p)
    p.add_argument("--print", action="store_true", help="print the resolved recipe")
    sub.add_parser("reference", help="print the reference of every recipe section and key")
    return ap


def cmd_run(args: argparse.Namespace) -> int:
    from accelengine.runner import run

    summary = run(args.recipe, args.overrides, args.out)
    return EXIT_OK if summary["status"] in ("completed", "stopped") else EXIT_FAILED


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


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "reference": cmd_reference}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (RecipeError, EngineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
