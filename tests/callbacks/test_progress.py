"""ProgressBar: plain lines when stdout is not a terminal, a redrawn bar when it is, main process only."""

from __future__ import annotations

import re

from accelengine import LogConfig
from accelengine.callbacks import ProgressBar

from .helpers import tiny_engine


def test_plain_lines_when_not_a_terminal(capsys):
    tiny_engine(log=LogConfig(progress_every_s=0, console=False, param_table=False, summary=False)).fit()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "\r" not in out  # capsys is not a terminal: no bar redraws
    # one line per optimizer step with every_s=0, plus the final line
    assert len(lines) == 8 + 1
    assert re.match(r"epoch 1/2 step 1/8 1[23]% \d[\d.]* steps/s ETA \d:\d\d:\d\d$", lines[0])
    assert "loss" in lines[2] and "val/accuracy" not in lines[2]  # the first log is at step 2, eval after step 4
    assert "step 5/8" in lines[4] and "val/accuracy" in lines[4]  # the last evaluation's metric is shown
    assert re.match(r"epoch 2/2 step 8/8 100% .* loss [\d.]+ val/accuracy [\d.]+ in \d:\d\d:\d\d$", lines[-1])


def test_default_interval_prints_only_the_final_line(capsys):
    tiny_engine(log=LogConfig(console=False, param_table=False, summary=False, progress=True)).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 1 and "step 8/8" in lines[0]


def test_bar_on_a_terminal_clears_itself_for_console_lines(capsys):
    bar = ProgressBar(refresh_s=0, force_tty=True, metric="val/loss")
    tiny_engine(callbacks=[bar], log=LogConfig(param_table=False, summary=False), steps=6, log_every=3).fit()
    out = capsys.readouterr().out
    assert "\r\x1b[K" in out and "[##" in out and "val/loss" in out
    # each console line starts on a clean line: the bar was cleared right before it
    assert "\r\x1b[Kepoch 0 step 3  train/loss" in out
    assert out.endswith("\n")


def test_other_console_lines_do_not_start_inside_the_bar(capsys):
    import logging

    from accelengine import Callback

    class Says(Callback):
        def after_fit_step(self, engine):
            if engine.state.step == 2:
                logging.getLogger("accelengine").info("something happened")

    bar = ProgressBar(refresh_s=0, force_tty=True)
    tiny_engine(callbacks=[bar, Says()], log=LogConfig(console=False, param_table=False, summary=False), steps=3).fit()
    out = capsys.readouterr().out
    assert "\r\x1b[Ksomething happened\n" in out  # the bar was cleared right before the line


def test_switched_off(capsys):
    tiny_engine(log=LogConfig(progress=False, console=False, param_table=False, summary=False)).fit()
    assert "steps/s" not in capsys.readouterr().out


def test_steps_mode_shows_no_epoch_total(capsys):
    tiny_engine(steps=3, log=LogConfig(progress_every_s=0, console=False, param_table=False, summary=False)).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert lines[0].startswith("epoch 1 step 1/3 ")


def test_periodic_lines_in_a_log_file_come_at_logged_records_only(capsys):
    # not a terminal, every_s > 0: nothing polls per step; a due line is written when a record is logged
    tiny_engine(log=LogConfig(progress_every_s=1e-9, console=False, param_table=False, summary=False)).fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    steps = [int(re.search(r"step (\d+)/8", line).group(1)) for line in lines]
    # training records at steps 2, 4, 6, 8, evaluations after each epoch (steps 4 and 8), then the final line
    assert steps == [2, 4, 4, 6, 8, 8, 8]
    assert "val/accuracy" not in lines[1] and "val/accuracy" in lines[2]  # the evaluation's own record shows it


def test_epochs_over_a_data_set_without_a_length_show_no_total(capsys):
    import torch
    from torch.utils.data import IterableDataset

    from accelengine import MLP, DataConfig, Engine, TrainerConfig

    class Stream(IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(32):
                yield torch.randn(8, generator=g), torch.randint(0, 3, (), generator=g)

    engine = Engine(
        model=MLP(8, 3, hidden=[16]),
        data={"train": Stream()},
        loss=torch.nn.CrossEntropyLoss(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        config=TrainerConfig(device="cpu", epochs=2, log_every=2),
        data_config=DataConfig(batch_size=8),
        log_config=LogConfig(progress_every_s=0, console=False, param_table=False, summary=False),
    )
    assert engine.fit()["status"] == "completed"  # the length of training is unknown: not a reason to fail
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 8 + 1
    assert re.match(r"epoch 1/2 step 1 \d[\d.]* steps/s", lines[0])  # no total, percentage or ETA to show
    assert re.match(r"epoch 2/2 step 8 .*loss [\d.]+ in \d:\d\d:\d\d$", lines[-1])
