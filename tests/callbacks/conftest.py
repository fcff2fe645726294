"""Every run here sets up the `accelengine` logger (handlers, `propagate = False`); put it back afterwards so that
tests elsewhere which capture log records (caplog) see them, whatever the order tests run in."""

from __future__ import annotations

import pytest

from .helpers import pristine_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    with pristine_logging():
        yield
