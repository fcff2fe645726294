"""The README's Python example runs as written."""

from __future__ import annotations

import re

from .conftest import ROOT


def test_python_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## From Python.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    summary = scope["summary"]
    assert summary["status"] == "completed" and summary["final"]["val/accuracy"] > 0.9
    assert (tmp_path / "runs" / "mine" / "summary.json").is_file()


def test_quickstart_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in readme and "python -m pytest" in ci
    assert "torch==2.13.0" in readme and "torch==2.13.0" in ci
    assert 'pip install -e ".[test]"' in readme and 'pip install -e ".[test]"' in ci
