"""curves.png: a run's loss and accuracy by epoch, and a sweep's val_acc by epoch per setting.
matplotlib's object API only (no pyplot, no global figure state), so a picture can be drawn on
a background thread."""

from __future__ import annotations

import os

from resnet_jax.atomic import replacing


def plot_curves(history, path: str, lr_epochs=()):
    """curves.png of a run (`run_figure`), written whole. Uses matplotlib's object API (no
    pyplot, no global figure state), so it can run on the `EpochWriter`'s background thread."""
    save(run_figure(history, lr_epochs), path)


def run_figure(history, lr_epochs=()):
    """Loss and accuracy, train vs val, by epoch (whole numbers on the axis); dotted lines where
    the rate changes."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "loss", "loss (with L2)"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [r[key] for r in history], "o-", ms=3, label=f"train {key}")
        ax.plot(
            epochs,
            [r["val_" + key] for r in history],
            "o-",
            ms=3,
            label=f"val {key} ({history[-1].get('val_on', 'test')} set)",
        )
        for i, boundary in enumerate(e for e in lr_epochs if epochs and e < epochs[-1]):
            ax.axvline(
                boundary + 0.5, color="gray", ls=":", lw=1, label="learning rate drops" if i == 0 else None
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    if history:
        lr = history[-1].get("lr")
        rate = "" if lr is None else f", lr {lr:g}"
        axes[1].set_title(f"accuracy (last val_acc {history[-1]['val_acc']:.4f}{rate})")
    # Fixed margins, wide enough for tick labels of six characters (0.0012): tight_layout would
    # draw the figure once more to measure them, a third of a picture's time (redrawn every epoch).
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.146, top=0.909, wspace=0.14)
    return fig


def curves_figure(groups, title: str):
    """val_acc by epoch of groups of runs [(label, [history, ...]), ...]: each group's mean with
    markers and a ± sd band (two runs or more); with one group, each run too (thin). Epochs are
    whole numbers on the axis."""
    import statistics

    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    longest = max(len(h) for _, histories in groups for h in histories)
    if longest == 1:  # one epoch: each setting's mean ± sd side by side, not a dot per line
        means = [statistics.fmean(h[0]["val_acc"] for h in histories) for _, histories in groups]
        sds = [statistics.stdev(h[0]["val_acc"] for h in hs) if len(hs) > 1 else 0.0 for _, hs in groups]
        for k, (_, histories) in enumerate(groups):
            ax.errorbar([k], [means[k]], yerr=[sds[k]], fmt="o", ms=7, capsize=5, color=f"C{k % 10}")
            for h in histories:
                ax.plot([k + 0.12], [h[0]["val_acc"]], ".", color=f"C{k % 10}", alpha=0.5)
        ax.set_xticks(range(len(groups)), [f"{label} (n={len(h)})" for label, h in groups], fontsize="small")
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel("val_acc after 1 epoch (mean ± sd, and each run)")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        return fig
    for k, (label, histories) in enumerate(groups):
        color = f"C{k % 10}"
        if len(groups) == 1:
            for history in histories:
                ax.plot(
                    [r["epoch"] for r in history], [r["val_acc"] for r in history], ".-", lw=0.8, alpha=0.5
                )
        length = min(len(h) for h in histories)
        epochs = list(range(1, length + 1))
        values = [[h[i]["val_acc"] for h in histories] for i in range(length)]
        mean = [statistics.fmean(v) for v in values]
        n = len(histories)
        ax.plot(
            epochs, mean, "o-", color="k" if len(groups) == 1 else color, lw=2, ms=5, label=f"{label} (n={n})"
        )
        if n > 1:
            sd = [statistics.stdev(v) for v in values]
            lo, hi = [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
            ax.fill_between(epochs, lo, hi, color="k" if len(groups) == 1 else color, alpha=0.15, lw=0)
    ax.set_xlim(0.5, longest + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val_acc (mean ± sd)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def save(fig, path: str):
    """A figure as a PNG, written whole or not at all."""
    with replacing(path, os.path.basename(path)) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
