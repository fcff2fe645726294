"""RunFiles: the reproducibility records (env.json, the code snapshot) and the determinism warning."""

from __future__ import annotations

import json

from accelengine import LogConfig
from accelengine.rundir import snapshot_code

from .helpers import tiny_engine


def test_copy_code_snapshots_the_source(tmp_path, monkeypatch):
    src = tmp_path / "project"
    (src / "pkg").mkdir(parents=True)
    (src / "train.py").write_text("print('hi')\n")
    (src / "pkg" / "model.py").write_text("X = 1\n")
    (src / "notes.txt").write_text("not code\n")
    (src / ".venv" / "lib").mkdir(parents=True)
    (src / ".venv" / "lib" / "site.py").write_text("")
    old_run = src / "runs" / "old"
    (old_run / "code").mkdir(parents=True)
    (old_run / "env.json").write_text("{}")
    (old_run / "code" / "train.py").write_text("")  # an earlier run's snapshot is not the user's source
    monkeypatch.chdir(src)

    out = tmp_path / "run"
    engine = tiny_engine(out_dir=out, steps=1, log=LogConfig(progress=False, copy_code=["*.py", "pkg/**/*.py"]))
    engine.fit()
    assert (out / "code" / "train.py").read_text() == "print('hi')\n"
    assert (out / "code" / "pkg" / "model.py").is_file()
    assert not (out / "code" / "notes.txt").exists()
    env = json.loads((out / "env.json").read_text())
    assert env["code_snapshot"] == ["train.py", "pkg/model.py"]

    copied = snapshot_code(["**/*.py"], src, tmp_path / "all")
    assert sorted(copied) == ["pkg/model.py", "train.py"]  # no hidden folders, no run directories


def test_code_root_is_the_engine_attribute(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("A = 1\n")
    engine = tiny_engine(out_dir=tmp_path / "run", steps=1, log=LogConfig(progress=False, copy_code=["*.py"]))
    engine.code_root = tmp_path / "src"
    engine.fit()
    assert (tmp_path / "run" / "code" / "a.py").is_file()


def test_warns_when_not_deterministic(capsys):
    tiny_engine(steps=1, log=LogConfig(progress=False, console=False, param_table=False, summary=False)).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if "deterministic" in line]
    assert len(lines) == 1 and "trainer.deterministic = true" in lines[0]


def test_no_warning_when_deterministic(capsys):
    import torch

    try:
        engine = tiny_engine(
            steps=1, deterministic=True, log=LogConfig(progress=False, console=False, param_table=False, summary=False)
        )
        assert torch.are_deterministic_algorithms_enabled()
        engine.fit()
    finally:
        torch.use_deterministic_algorithms(False)
    assert "deterministic" not in capsys.readouterr().out


def test_log_txt_is_closed_when_the_run_ends(tmp_path):
    import logging

    engine = tiny_engine(out_dir=tmp_path, steps=2)
    engine.fit()
    logging.getLogger("accelengine").warning("a later line of the process, not of the run")
    text = (tmp_path / "log.txt").read_text()
    assert "run completed" in text and "a later line" not in text  # the summary is in; what came after is not
    handlers = logging.getLogger("accelengine").handlers
    assert not [h for h in handlers if isinstance(h, logging.FileHandler)]


def test_what_set_up_reports_is_in_log_txt_and_a_failed_set_up_closes_it(tmp_path):
    import logging

    import pytest

    from accelengine import CheckpointConfig
    from accelengine.checkpoint import CheckpointError

    out = tmp_path / "run"
    tiny_engine(out_dir=out, steps=4, checkpoint=CheckpointConfig(every_steps=4)).fit()
    checkpoint = out / "checkpoints" / "step-00000004"
    assert "resumed from" not in (out / "log.txt").read_text()
    tiny_engine(out_dir=out, steps=8, checkpoint=CheckpointConfig(every_steps=4), resume_from=checkpoint).fit()
    assert f"INFO resumed from {checkpoint} (epoch 0, step 4)" in (out / "log.txt").read_text()

    fine_tuned = tmp_path / "fine-tuned"
    tiny_engine(out_dir=fine_tuned, steps=1, checkpoint=CheckpointConfig(init_from=str(checkpoint))).fit()
    assert f"INFO initialised the model from {checkpoint}" in (fine_tuned / "log.txt").read_text()

    # set-up fails: the run's log is closed all the same
    with pytest.raises(CheckpointError, match="no-such-checkpoint"):
        tiny_engine(out_dir=tmp_path / "refused", steps=1, resume_from=tmp_path / "no-such-checkpoint").fit()
    files = [h for h in logging.getLogger("accelengine").handlers if isinstance(h, logging.FileHandler)]
    assert files == []
