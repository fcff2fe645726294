"""`accelengine report`: PNG plots of one run or several overlaid, a short summary, the missing-matplotlib message."""

from __future__ import annotations

import json
import sys

from accelengine import LogConfig
from accelengine.cli import main
from accelengine.report import find_runs, load_metrics, quantity, report

from .callbacks.helpers import tiny_engine

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(path, lr=0.1):
    tiny_engine(out_dir=path, lr=lr, steps=6, eval_every=3, log=LogConfig(progress=False, trackers=[])).fit()
    return path


def is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and data[12:16] == b"IHDR" and len(data) > 1000


def test_one_run(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", str(run)]) == 0
    names = sorted(p.name for p in (run / "plots").iterdir())
    assert names == ["accuracy.png", "loss.png", "lr.png"]
    assert all(is_png(run / "plots" / n) for n in names)
    out = capsys.readouterr().out
    assert "run: completed, 6 steps, train/loss" in out and "3 plots in" in out


def test_a_summary_left_by_an_earlier_attempt_is_not_reported_as_the_run(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    env = json.loads((run / "env.json").read_text())
    (run / "env.json").write_text(json.dumps({**env, "attempt": "later"}))  # a later attempt started, then was killed
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "run: no summary.json of its latest attempt, 6 steps" in out and "completed" not in out


def test_several_runs_overlaid(tmp_path, monkeypatch):
    session = tmp_path / "session"
    make_run(session / "experiments" / "lr_0.1", lr=0.1)
    make_run(session / "experiments" / "lr_0.01", lr=0.01)
    assert [p.name for p in find_runs(session)] == ["lr_0.01", "lr_0.1"]

    from matplotlib.figure import Figure

    legends = {}
    save = Figure.savefig

    def keep_legend(fig, path, **kw):
        legends[path.name] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
        return save(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", keep_legend)
    files, lines = report(session, tmp_path / "out")
    assert all(is_png(f) for f in files) and {f.parent for f in files} == {tmp_path / "out"}
    # loss: a training panel and an evaluation panel, one line per run, labelled by the run's relative path
    assert legends["loss.png"] == [
        ["experiments/lr_0.01: train/loss", "experiments/lr_0.1: train/loss"],
        ["experiments/lr_0.01: val/loss", "experiments/lr_0.1: val/loss"],
    ]
    assert [line.split(":")[0] for line in lines] == ["experiments/lr_0.01", "experiments/lr_0.1"]


def test_missing_matplotlib(tmp_path, monkeypatch, capsys):
    run = make_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(run)]) == 2
    assert "pip install 'accelengine[plot]'" in capsys.readouterr().err


def test_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl found" in capsys.readouterr().err


def test_reading_metrics(tmp_path):
    lines = [
        {"step": 2, "epoch": 0, "train/loss": 1.0, "train/lr": 0.1},
        {"step": 4, "epoch": 0, "train/loss": "nan"},
        {"step": 4, "epoch": 0, "train/loss": 0.5},  # a resumed run logged step 4 again: the later one wins
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n{broken")
    got = load_metrics(path)
    assert got == {"train/loss": [(2, 1.0), (4, 0.5)], "train/lr": [(2, 0.1)]}
    assert [quantity(k) for k in ("train/loss", "val/loss", "train/lr", "lr/head", "perf/samples_per_s")] == [
        "loss",
        "loss",
        "lr",
        "lr",
        "samples_per_s",
    ]


def test_out_naming_a_file_is_one_message(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (tmp_path / "loss.png").write_bytes(PNG)
    assert main(["report", str(run), "--out", str(tmp_path / "loss.png")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the plots to `{tmp_path / 'loss.png'}`" in err and "give --out a directory" in err
