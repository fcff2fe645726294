"""pytest-benchmark micro-benchmarks: `bench_*.py` files in this folder (never part of the unit test run, whose
`testpaths` is `tests/`).

    python -m pytest benchmarks --benchmark-only                       # all of them (a few minutes)
    python -m pytest benchmarks/bench_engine.py --benchmark-only       # one file
    python -m pytest benchmarks --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

The figures with their targets and ratios come from the plain scripts (`python benchmarks/run_all.py` writes
`benchmarks/RESULTS.md`); these cases make the same comparisons under pytest-benchmark's statistics, and its
`--benchmark-autosave` / `--benchmark-compare` track them over time.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the bench files import the scripts next to them (overhead.py, resume_skip.py, ...)
    sys.path.insert(0, str(HERE))


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # pytest collects `test_*.py` by default; the benchmarks are named `bench_*.py` so that nothing else picks them
    # up. A file named on the command line is collected by pytest itself.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True, scope="session")
def _quiet_single_thread():
    """One intra-op thread, as in the scripts (and the engine's own figures); no engine log lines in the timings."""
    torch.set_num_threads(1)
    logging.getLogger("accelengine").disabled = True
    yield
