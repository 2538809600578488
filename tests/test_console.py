"""What an epoch's progress looks like where the output goes: redrawn in place on a terminal and
in a Jupyter kernel (tests/test_kernel.py drives a real one), a line now and then in a log."""

import io

from resnet_jax.device.metrics import Sums
from resnet_jax.runs.console import Console, live_display


class Terminal(io.StringIO):
    def isatty(self):
        return True


SUMS = Sums(loss=23.0, correct=4.0, count=10.0)


def test_a_log_gets_a_progress_line_every_so_often_and_nothing_between(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("resnet_jax.runs.console.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    console = Console(2, out, log_every=30.0)
    console.epoch_start(1, 3, 1e-3)
    for step, now in ((10, 110.0), (20, 125.0), (30, 131.0), (40, 150.0), (50, 162.0)):
        clock[0] = now
        console.progress(step, 100, SUMS, start=100.0, batch_size=32)
    lines = out.getvalue().splitlines()[2:]  # after "Epoch 1/3", "Learning rate"
    assert [line.split(" ")[0] for line in lines] == ["30/100", "50/100"], lines  # 31 s, then 31 s more
    assert "ETA: 1:12" in lines[0] and "31 img/s" in lines[0] and "loss: 2.3000 - acc: 0.4000" in lines[0]
    assert "\r" not in out.getvalue()


def test_a_terminal_redraws_the_line_and_verbosity_1_draws_nothing():
    out = Terminal()
    console = Console(2, out)
    assert live_display(out) == "terminal" and console.bar
    console.epoch_start(1, 1, None)
    console.progress(5, 10, SUMS, start=0.0, batch_size=8)
    console.end_bar()
    assert out.getvalue().startswith("Epoch 1/1\n\r5/10 [") and out.getvalue().endswith("\r\x1b[K")
    quiet = Terminal()
    Console(1, quiet).progress(5, 10, SUMS, start=0.0, batch_size=8)
    assert quiet.getvalue() == ""
    assert live_display(io.StringIO()) is None  # a pipe, a file


def test_pictures_label_whole_epochs_and_a_one_epoch_sweep_shows_its_settings_side_by_side():
    from resnet_jax.runs.plots import curves_figure, run_figure

    record = lambda e, v: {"epoch": e, "loss": 1.0, "acc": v, "val_loss": 1.0, "val_acc": v, "lr": 1e-3}
    fig = run_figure([record(1, 0.2), record(2, 0.3)])
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # no epoch 1.5
    one = curves_figure(
        [("lr=0.001", [[record(1, 0.2)], [record(1, 0.3)]]), ("lr=0.003", [[record(1, 0.4)]])], "t"
    )
    ax = one.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lr=0.001 (n=2)", "lr=0.003 (n=1)"]
    assert "after 1 epoch" in ax.get_ylabel()
