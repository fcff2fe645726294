"""The built-in callback set an engine starts with, from the `[log]` section (`LogConfig` in Python)."""

from __future__ import annotations

from collections.abc import Iterable

from accelengine.callbacks.base import Callback
from accelengine.callbacks.console import ConsoleLogger
from accelengine.callbacks.metrics_writer import MetricsWriter
from accelengine.callbacks.nan_guard import NanGuard
from accelengine.callbacks.param_table import ParamTable
from accelengine.callbacks.progress import ProgressBar
from accelengine.callbacks.run_files import RunFiles
from accelengine.callbacks.run_summary import RunSummary
from accelengine.callbacks.trackers import Trackers
from accelengine.recipe.schema import LogSection


def default_callbacks(
    log: LogSection, given: Iterable[Callback] = ()
) -> tuple[list[Callback], list[Callback], list[Callback]]:
    """The built-ins and the given callbacks as `(first, given, last)`: the engine registers `first` (the built-ins),
    the given callbacks in their order, then `last` (`RunSummary`, so that `summary.json` holds what every callback
    added).

    A given callback that is an instance of a built-in's class takes that built-in's place (the order among the
    built-ins matters: the progress bar clears its line before the console logger prints): pass
    `NanGuard(mode="skip")` or `ProgressBar(metric="val/loss")` to change one, for instance.
    """
    first: list[Callback] = [RunFiles(copy_code=log.copy_code)]  # first: the run's records before the others write
    if log.nan_guard != "off":
        first.append(NanGuard(mode=log.nan_guard))
    if log.param_table:
        first.append(ParamTable())
    first.append(MetricsWriter())
    if log.progress:
        first.append(ProgressBar(every_s=log.progress_every_s))  # before the console logger: it clears its line
    if log.console:
        first.append(ConsoleLogger())
    first.append(Trackers(project=log.project, tracker_kwargs=log.tracker_kwargs))
    last: list[Callback] = [RunSummary(print_summary=log.summary)]
    slots = [type(cb) for cb in first + last]  # the built-in classes, by position
    taken: set[int] = set()
    rest = []
    for cb in given:
        slot = next((i for i, kind in enumerate(slots) if isinstance(cb, kind) and i not in taken), None)
        if slot is None:  # not a built-in, or a second one of the same kind: it runs where it was given
            rest.append(cb)
            continue
        taken.add(slot)
        if slot < len(first):
            first[slot] = cb
        else:
            last[slot - len(first)] = cb
    return first, rest, last
