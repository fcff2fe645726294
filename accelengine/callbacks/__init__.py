"""Callbacks: the hook base class and the built-in set."""

from accelengine.callbacks.base import HOOKS, Callback
from accelengine.callbacks.console import ConsoleLogger
from accelengine.callbacks.metrics_writer import MetricsWriter

__all__ = ["HOOKS", "Callback", "ConsoleLogger", "MetricsWriter"]
