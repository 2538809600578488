"""What a run (or a sweep) writes and prints goes through one gate (resnet_jax.writer): process 0
writes, the others nothing; a start that fails leaves no lock behind."""

import json
import os

import pytest

import resnet_jax as rj
from resnet_jax.runs.writer import Writer

REC = {"epoch": 1, "lr": 0.001, "loss": 2.0, "acc": 0.1, "val_loss": 2.1, "val_acc": 0.2, "seconds": 1.0}


def write_everything(w):
    with w.claim():
        w.console.line("hello")
        w.run_json({"config": {}})
        w.history([REC])
        w.holdout([3, 1])
        w.start_epochs((26,))
        w.epoch(REC, [REC])
        w.close()
    w.json("summary.json", {"settings": []})  # a sweep's files: the same gate
    w.figure("sweep.png", lambda: __import__("matplotlib.figure").figure.Figure())


def test_off_process_0_nothing_is_written_or_printed(tmp_path, capsys):
    workdir = tmp_path / "w"
    write_everything(Writer(str(workdir), verbosity=2, primary=False))
    assert os.listdir(workdir) == []  # made (every process needs it for orbax), nothing in it
    assert capsys.readouterr().out == ""


def test_process_0_writes_every_file_and_line(tmp_path, capsys):
    workdir = tmp_path / "w"
    write_everything(Writer(str(workdir), verbosity=1, primary=True))
    assert {"run.json", "metrics.jsonl", "holdout.json", "curves.png", "tensorboard", ".lock"} <= set(
        os.listdir(workdir)
    )
    assert {"summary.json", "sweep.png"} <= set(os.listdir(workdir))
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == [REC, REC]  # rewritten history, then the epoch
    assert capsys.readouterr().out == "hello\n"


@pytest.mark.parametrize("existed", [False, True])
def test_a_failed_start_leaves_no_lock_behind(tmp_path, existed):
    workdir = tmp_path / "w"
    if existed:
        workdir.mkdir()
    with pytest.raises(rj.UserError, match="bad data"):
        with Writer(str(workdir), primary=True).claim():
            raise rj.UserError("bad data")
    assert workdir.exists() == existed and (not existed or os.listdir(workdir) == [])


def test_short_epochs_are_drawn_at_most_every_few_seconds_and_the_last_at_close(tmp_path, monkeypatch):
    """curves.png: the first epoch drawn at once, epochs quicker than `redraw_seconds` deferred
    (matplotlib holds Python's lock while it draws), and `close` draws the last one."""
    from resnet_jax.runs import plots, writer

    drawn = []
    monkeypatch.setattr(plots, "plot_curves", lambda history, path, lr_epochs: drawn.append(len(history)))
    epochs = writer.EpochWriter(str(tmp_path), redraw_seconds=3600)
    history = []
    for epoch in range(1, 6):
        history.append(dict(REC, epoch=epoch))
        epochs.write(history[-1], history)
    epochs.pending.result()  # the first picture, drawn on its thread
    assert drawn == [1]
    epochs.close()
    assert drawn == [1, 5]
    assert len(open(tmp_path / "metrics.jsonl").read().splitlines()) == 5  # the lines are not deferred

    drawn.clear()
    os.makedirs(tmp_path / "every")
    every = writer.EpochWriter(str(tmp_path / "every"), redraw_seconds=0)
    for epoch in range(1, 4):
        every.write(dict(REC, epoch=epoch), history[:epoch])
        every.pending.result()  # each drawn before the next epoch: none superseded
    every.close()
    assert drawn == [1, 2, 3]
