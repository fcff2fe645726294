"""Sessions and sweeps: many experiments from one recipe, run locally (in parallel if asked) or on SLURM.

    accelengine sweep recipes/digits_sweep.toml --parallel 2

In a session recipe a key ending in `_` whose value is a list is a grid axis (`lr_ = [1e-3, 1e-2]`); `[sweep]`
adds random search, seed repeats and the metric that picks the best experiment. See docs/sweeps.md.
"""

from accelengine.sweep.expand import DISTRIBUTIONS, Distribution, Experiment, SweepConfig, expand, parse_session
from accelengine.sweep.results import Row
from accelengine.sweep.session import Session, SessionResult, load_session, plan, run_session

__all__ = [
    "DISTRIBUTIONS",
    "Distribution",
    "Experiment",
    "Row",
    "Session",
    "SessionResult",
    "SweepConfig",
    "expand",
    "load_session",
    "parse_session",
    "plan",
    "run_session",
]
