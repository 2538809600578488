"""A sweep's summary: each setting's runs as rows, their mean ± sd, the difference of each
setting's mean test accuracy from the first's with a 95 % interval (Welch's t, by scipy), the
setting chosen on validation and what validated; written as summary.json and curves.png, and
said as a table on the console. A setting is named (and its folder too) by `label`. `plan`
is the sweep's (resnet_jax.runs.sweeps.Plan): its settings, seeds and folders; `writer` its
resnet_jax.runs.writer.Writer.
"""

from __future__ import annotations

import os
import statistics
import warnings

from resnet_jax.checkpoint import run_files
from resnet_jax.config import Config
from resnet_jax.errors import UserError
from resnet_jax.runs.console import table

SUMMARY_FILE = "summary.json"


def render(value) -> str:
    """A value as a setting's folder names it: 0.001, 3-3-2, True."""
    if isinstance(value, tuple):
        return "-".join(render(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def label(fields: dict) -> str:
    """A setting's name, and its folder: learning_rate=0.001,num_filters=16 ('' for no grid)."""
    return ",".join(f"{k}={render(v)}" for k, v in fields.items())


def finished(folder: str) -> bool:
    try:
        saved = run_files.read_run(folder)
    except UserError:
        return False
    return saved is not None and saved[1].get("test") is not None


def write(writer, plan, config: Config) -> dict:
    """summary.json and curves.png from the runs finished now (under W's lock), and the console's
    closing table; returns the summary."""
    summary, histories = summarize(plan, config)
    if writer.primary:
        with run_files.Lock(plan.workdir, wait=True):
            summary, histories = summarize(plan, config)  # what is finished now, under the lock
            writer.json(SUMMARY_FILE, summary)
            if any(histories.values()):
                writer.figure("curves.png", lambda: _figure(plan, histories))
    for line in summary_lines(summary):
        writer.console.line(line)
    return summary


def _figure(plan, histories: dict):
    from resnet_jax.runs.plots import curves_figure

    groups = [
        (label(f) or "mean of the seeds", histories[label(f)])
        for f, _ in plan.settings
        if histories[label(f)]
    ]
    title = (
        f"val_acc of {len(plan.seeds)} seed(s)"
        if not plan.grid
        else f"val_acc by setting, {len(plan.seeds)} seed(s) each"
    )
    return curves_figure(groups, title)


def _run_row(folder: str, seed: int) -> tuple[dict, list] | None:
    if not finished(folder):
        return None
    _, info = run_files.read_run(folder)
    history = run_files.read_metrics(folder)
    best = max(history, key=lambda r: r["val_acc"])
    row = {
        "seed": seed,
        "test_accuracy": info["test"]["accuracy"],
        "test_loss": info["test"]["loss"],
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "seconds": round(sum(r["seconds"] for r in history), 1),
    }
    return row, history


def mean_sd(values) -> dict:
    """{"mean", "sd"}: the sample standard deviation (None for one value)."""
    values = list(values)
    return {
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
    }


def welch(a, b) -> dict:
    """The difference of means b - a with a 95 % interval by Welch's t (unequal variances:
    scipy.stats.ttest_ind(b, a, equal_var=False)); no interval when either has fewer than two
    values, and a point when every value is the same."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "ci95": None, "why": "a setting with one seed: no interval can be given"}
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return {"diff": diff, "ci95": [diff, diff], "why": "every seed gave the same accuracy"}
    from scipy import stats

    with warnings.catch_warnings():  # one setting's seeds all equal: scipy's moments warn of a
        # cancellation (its variance is ~1e-34, not 0), yet the interval is the other's alone
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        result = stats.ttest_ind(b, a, equal_var=False)
    low, high = result.confidence_interval(0.95)
    return {"diff": diff, "ci95": [float(low), float(high)], "df": float(result.df)}


def summarize(plan, config: Config) -> tuple[dict, dict]:
    """summary.json of what is finished, and the val_acc histories by setting label."""
    entries, histories = [], {}
    for fields, setting_config in plan.settings:
        rows, curves = [], []
        for seed in plan.seeds:
            found = _run_row(plan.folder(fields, seed), seed)
            if found is not None:
                rows.append(found[0])
                curves.append(found[1])
        histories[label(fields)] = curves
        entry = {
            "fields": {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
            "dir": os.path.relpath(os.path.dirname(plan.folder(fields, 0)), plan.workdir),
            "seeds": [r["seed"] for r in rows],
            "missing": [s for s in plan.seeds if s not in [r["seed"] for r in rows]],
            "test_accuracy": mean_sd(r["test_accuracy"] for r in rows),
            "val_acc": mean_sd(r["best_val_acc"] for r in rows),
            "held_out": bool(setting_config.val_split),
            "runs": rows,
        }
        entries.append(entry)
    first = [r["test_accuracy"] for r in entries[0]["runs"]] if entries else []
    for entry in entries[1:]:
        mine = [r["test_accuracy"] for r in entry["runs"]]
        entry["vs_first"] = welch(first, mine) if first and mine else None
    summary = {
        "settings": entries,
        "interval": "vs_first: the difference of mean test accuracy from the first setting's, with a "
        "95 % interval by Welch's t",
        "complete": all(not e["missing"] for e in entries),
        "chosen": _choose(entries),
    }
    if not plan.grid and entries:  # --seeds's summary as it always was, at the top level too
        entry = entries[0]
        accuracy = [r["test_accuracy"] for r in entry["runs"]]
        summary.update(
            seeds=entry["seeds"],
            test_accuracy=accuracy,
            mean=entry["test_accuracy"]["mean"],
            sd=entry["test_accuracy"]["sd"] if len(accuracy) > 1 else 0.0,
            n=len(accuracy),
            runs=entry["runs"],
        )
    return summary, histories


def _choose(entries) -> dict | None:
    """The setting with the best mean val_acc, and what validated: held-out training images
    (--val_split), or the test set (the seed's way; then the test set chose it)."""
    done = [e for e in entries if e["runs"]]
    if not done:
        return None
    best = max(done, key=lambda e: e["val_acc"]["mean"])
    held_out = all(e["held_out"] for e in done)
    return {
        "dir": best["dir"],
        "fields": best["fields"],
        "by": "mean best val_acc over its seeds",
        "validated_on": "held-out training images (--val_split)" if held_out else "the test set",
        "test_set_chose": not held_out,
    }


def summary_lines(summary: dict) -> list[str]:
    """The console's closing table: per seed for a sweep of one setting, else per setting."""
    entries = summary["settings"]
    if not entries:
        return []
    if "runs" in summary:  # one setting: a row per seed, then mean ± sd
        header = ("seed", "test_acc", "test_loss", "best_val_acc (epoch)", "seconds")
        rows = [
            (
                r["seed"],
                f"{r['test_accuracy']:.4f}",
                f"{r['test_loss']:.4f}",
                f"{r['best_val_acc']:.4f} ({r['best_epoch']})",
                f"{r['seconds']:.0f}",
            )
            for r in summary["runs"]
        ]
        lines = ["", *table(header, rows)]
        if summary["n"]:
            mean, sd = summary["mean"], summary["sd"]
            lines.append(f"Test accuracy over {summary['n']} seeds: {mean:.4f} ± {sd:.4f} (mean ± sd)")
        return lines
    header = ("setting", "n", "val_acc", "test_acc", "vs first (95 % interval)")
    rows = []
    for i, e in enumerate(entries):
        vs = e.get("vs_first")
        if i == 0 or vs is None:
            versus = "" if i == 0 else "no runs yet"
        elif vs["ci95"] is None:
            versus = f"{vs['diff']:+.4f} (one seed: no interval)"
        else:
            versus = f"{vs['diff']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]"
        rows.append((label(e["fields"]), len(e["runs"]), _pm(e["val_acc"]), _pm(e["test_accuracy"]), versus))
    lines = ["", *table(header, rows)]
    chosen = summary["chosen"]
    if chosen is not None:
        lines.append(
            f"Best on validation ({chosen['by']}, on {chosen['validated_on']}): {label(chosen['fields'])}"
            + (
                "; the test set chose it, so its test accuracy flatters it: hold images out with "
                "--val_split for a choice the test set does not make"
                if chosen["test_set_chose"]
                else "; the test set was used once per run, at its end, not to choose"
            )
        )
    if not summary["complete"]:
        lines.append(
            "Runs still missing (another process, a later shard, or a stop): the summary covers what finished"
        )
    return lines


def _pm(stats: dict) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.4f}" + ("" if stats["sd"] is None else f" ± {stats['sd']:.4f}")
