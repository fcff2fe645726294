"""Exceptions that carry a message meant for the user, not a traceback."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One mistake in a recipe: where it is, what is wrong, and how to fix it."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"`{self.path}`: " if self.path else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.message}{hint}"


class RecipeError(Exception):
    """Every problem found in a recipe, reported at once. The CLI prints it and exits with code 2."""

    def __init__(self, problems: list[Problem] | Problem | str, source: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return f"{head}invalid recipe: {self.problems[0]}"
        lines = [f"{head}invalid recipe, {len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class EngineError(RuntimeError):
    """A misconfiguration found at run time (launcher, environment, data); the CLI prints it and exits with code 2."""
