"""ConsoleLogger and metrics.jsonl: one line / one JSON object per logged record, on the console and in the files."""

from __future__ import annotations

import json
import logging
import re

from accelengine import Callback, LogConfig

from .helpers import tiny_engine

QUIET = {"progress": False, "param_table": False, "summary": False}


def test_console_and_log_txt_lines(tmp_path, capsys):
    tiny_engine(out_dir=tmp_path, steps=4, eval_every=4, log=LogConfig(**QUIET)).fit()
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split("  ")[0] for line in out] == ["epoch 0 step 2", "epoch 0 step 4", "epoch 0 step 4"]
    assert "train/loss" in out[0] and "val/accuracy" in out[2]
    logged = [line for line in (tmp_path / "log.txt").read_text().splitlines() if " INFO epoch" in line]
    assert len(logged) == 3
    # the same format as the logging module's own lines in log.txt (time stamp, level, message)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO epoch 0 step \d  .+", line) for line in logged)
    assert [line.split(" INFO ", 1)[1] for line in logged] == out
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 4] and "val/accuracy" in records[2]


def test_a_user_handler_still_sees_every_line(capsys):
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    log = logging.getLogger("accelengine")

    class Attach(Callback):
        def before_fit(self, engine):  # after RunFiles set the logger up
            log.addHandler(handler)

    try:
        tiny_engine(callbacks=[Attach()], steps=2, eval_every=2, log=LogConfig(**QUIET)).fit()
    finally:
        log.removeHandler(handler)
    assert [m.split("  ")[0] for m in seen if m.startswith("epoch")] == ["epoch 0 step 2", "epoch 0 step 2"]
    assert sum(line.startswith("epoch") for line in capsys.readouterr().out.splitlines()) == 2


def test_switched_off(capsys):
    tiny_engine(steps=2, log=LogConfig(console=False, **QUIET)).fit()
    assert not any(line.startswith("epoch") for line in capsys.readouterr().out.splitlines())
