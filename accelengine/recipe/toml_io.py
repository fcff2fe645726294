"""Reading and writing TOML recipes, and `--set key.path=value` overrides."""

from __future__ import annotations

import datetime as _dt
import math
import re
import sys
from pathlib import Path
from typing import Any

from accelengine.errors import Problem, RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def parse_toml(text: str, source: str = "<recipe>") -> dict[str, Any]:
    """Parse TOML text; a syntax error becomes a RecipeError naming file, line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = str(err)
        found = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        at_end = re.search(r"\(at end of document\)", msg)
        if found or at_end:
            if found:
                line, col = found.groups()
            else:
                lines = text.split("\n")
                line, col = str(len(lines)), str(len(lines[-1]) + 1)
            msg = msg[: (found or at_end).start()].strip()
            raise RecipeError(
                Problem("", f"TOML syntax error at line {line}, column {col}: {msg}"), f"{source}:{line}:{col}"
            ) from None
        raise RecipeError(Problem("", f"TOML syntax error: {msg}"), source) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file; missing files, text that is not UTF-8 and bad TOML raise RecipeError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(Problem("", f"recipe file `{path}` does not exist"), str(path)) from None
    except OSError as err:
        raise RecipeError(Problem("", f"cannot read recipe file `{path}`: {err}"), str(path)) from None
    return parse_toml(_decode(raw, path), str(path))


def _decode(raw: bytes, path: Path) -> str:
    """A recipe's bytes as text. TOML is UTF-8; the byte-order mark some Windows editors write first is not part of
    the text (`utf-8-sig` drops it). Other bytes raise RecipeError naming the line and column of the first bad one."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        line = raw.count(b"\n", 0, err.start) + 1
        column = len(raw[line_start : err.start].decode("utf-8-sig", errors="replace")) + 1
        raise RecipeError(
            Problem(
                "",
                f"not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line}, column {column}",
                "TOML files are UTF-8: save it as UTF-8 in your editor",
            ),
            f"{path}:{line}:{column}",
        ) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003). The value is parsed as TOML; a bare word stays a string. Keys
    are TOML keys too: `data."my.set".batch_size=8` sets the `my.set` data set's batch size."""
    key, sep, raw = item.partition("=")
    keys = _override_keys(key)
    if not sep or not keys:
        where = ".".join(keys) if keys else key.strip()
        hint = "write --set section.key=value, e.g. --set optim.lr=3e-4"
        array = key.partition("[")[0].strip()
        if "[" in key and array:
            hint = f"an array item cannot be set on its own: set the whole array, e.g. --set '{array}=[...]'"
        raise RecipeError(Problem(where, f"bad override `{item}`", hint))
    where = ".".join(keys)
    raw = raw.strip()
    if not raw:  # an empty shell variable, most often: an empty string would reach a component unnoticed
        raise RecipeError(
            Problem(
                where, f"bad override `{item}`: no value after `=`", f"for an empty string write --set '{where}=\"\"'"
            )
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        if raw[0] in "[{\"'":  # meant as an array, a table or a quoted string, not as these characters
            hint = f"check its brackets and quotes, and quote the whole override for the shell: --set '{where}=...'"
            msg = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)", "", str(err))
            raise RecipeError(
                Problem(where, f"bad override `{item}`: the value is not valid TOML: {msg}", hint)
            ) from None
        value = raw  # `--set name=mnist` means the string, as users expect
    return keys, value


def _override_keys(key: str) -> list[str]:
    """The key path of an override, or [] when it is not one."""
    if not any(c in key for c in "\"'[]"):
        keys = [k.strip() for k in key.split(".")]  # also the names TOML would need quoted, e.g. `data.café`
        return keys if all(keys) else []
    try:
        node: Any = tomllib.loads(f"{key} = 0")
    except tomllib.TOMLDecodeError:
        return []
    keys = []
    while isinstance(node, dict) and len(node) == 1:
        ((k, node),) = node.items()
        keys.append(k)
    return keys if node == 0 else []


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides in order, creating tables as needed. Returns `data` (modified in place). Every bad
    override is reported at once (RecipeError)."""
    problems: list[Problem] = []
    for item in overrides:
        try:
            keys, value = parse_override(item)
        except RecipeError as err:
            problems += err.problems
            continue
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            nxt = node.setdefault(key, {})
            if not isinstance(nxt, dict):
                where = ".".join(keys[: depth + 1])
                hint = f"set it whole instead, e.g. --set '{where}={{_component_ = \"...\", ...}}'"
                problems.append(
                    Problem(where, f"cannot set `{'.'.join(keys)}`: `{where}` is a value, not a table", hint)
                )
                break
            node = nxt
        else:
            node[keys[-1]] = value
    if problems:
        raise RecipeError(problems)
    return data


# --- writing --------------------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    # TOML strings may hold any Unicode except control characters, which must be escaped
    out = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c for c in out)
    return f'"{out}"'


def format_value(v: Any) -> str:
    """One TOML value (inline form for tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (_dt.date, _dt.time)):  # TOML dates, times and date-times (`datetime` is a `date`)
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {format_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(data: dict[str, Any], header: str = "") -> str:
    """Write a nested dict as TOML. Tables become `[a.b]` sections, lists of tables `[[a]]`; `None` values are
    written as comments (TOML has no null) so the file still documents the key and reads back without it."""
    lines: list[str] = [f"# {line}" if line else "#" for line in header.splitlines()]
    if lines:
        lines.append("")

    def is_table_list(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def emit(table: dict[str, Any], prefix: list[str]) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict) and not is_table_list(v)]
        for k, v in scalars:
            lines.append(f"# {_key(k)} = (unset)" if v is None else f"{_key(k)} = {format_value(v)}")
        for k, v in table.items():
            name = [*prefix, _key(k)]
            if isinstance(v, dict):
                lines.append("")
                lines.append(f"[{'.'.join(name)}]")
                emit(v, name)
            elif is_table_list(v):
                for item in v:
                    lines.append("")
                    lines.append(f"[[{'.'.join(name)}]]")
                    emit(item, name)

    emit(data, [])
    return "\n".join(lines).strip("\n") + "\n"
