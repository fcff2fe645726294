"""Callbacks: the hook base class and the built-in set (see `docs/callbacks.md`)."""

from accelengine.callbacks.base import HOOKS, Callback
from accelengine.callbacks.console import ConsoleLogger
from accelengine.callbacks.early_stopping import EarlyStopping
from accelengine.callbacks.ema import EMA
from accelengine.callbacks.grad_norm import GradNormMonitor
from accelengine.callbacks.lr_monitor import LearningRateMonitor
from accelengine.callbacks.metrics_writer import MetricsWriter
from accelengine.callbacks.nan_guard import NanGuard
from accelengine.callbacks.param_table import ParamTable
from accelengine.callbacks.progress import ProgressBar
from accelengine.callbacks.run_files import RunFiles
from accelengine.callbacks.run_summary import RunSummary
from accelengine.callbacks.throughput import ThroughputMonitor
from accelengine.callbacks.time_limit import TimeLimit
from accelengine.callbacks.trackers import Trackers

__all__ = [
    "EMA",
    "HOOKS",
    "Callback",
    "ConsoleLogger",
    "EarlyStopping",
    "GradNormMonitor",
    "LearningRateMonitor",
    "MetricsWriter",
    "NanGuard",
    "ParamTable",
    "ProgressBar",
    "RunFiles",
    "RunSummary",
    "ThroughputMonitor",
    "TimeLimit",
    "Trackers",
]
