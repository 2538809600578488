"""Many runs from one command: the seeds of one recipe, each a complete run, and their summary.

    W/seed_<s>/      exactly the workdir `--seed s` alone would make (run.json, metrics.jsonl,
                     checkpoints, curves.png, TensorBoard); `resnet_jax.restore(W/seed_<s>)` reads it
    W/runs.json      what the multi-run is: its seeds and the recipe they share (the seed aside)
    W/summary.json   per seed: test accuracy and loss, best val_acc and its epoch, seconds; and
                     the mean and standard deviation of the test accuracy
    W/curves.png     every seed's val_acc by epoch, and their mean

How the seeds execute is decided per platform (`tuning.Tuning.seeds_together`): one after
another on every platform today. Several states in one program could share a GPU (a batch-32
step of the seed model uses a sliver of an H200); that is measured by `benchmarks/many_runs.py`
before it is built. Each seed's data order, augmentation and initialisation are those of the single
run with that seed, so its metrics equal that run's, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import threading

from resnet_jax import workdir as wd
from resnet_jax.config import FIXED_FIELDS, Config
from resnet_jax.errors import UserError

RUNS_FILE = "runs.json"
SUMMARY_FILE = "summary.json"


def seed_dir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f"seed_{seed}")


def parse_seeds(text: str) -> tuple[int, ...]:
    """ "0,1,2", "0-3" or "0-3,7" -> the seeds, in order; one line for anything else."""
    seeds = []
    for part in (p.strip() for p in str(text).split(",")):
        span = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if span and int(span[2]) >= int(span[1]):
            seeds += range(int(span[1]), int(span[2]) + 1)
        elif part:
            try:
                seeds.append(int(part))
            except ValueError:
                raise UserError(f"--seeds takes seeds like 0,1,2 or 0-3, got {text!r}") from None
    check_seeds(seeds)
    return tuple(seeds)


def check_seeds(seeds):
    if not seeds:
        raise UserError("--seeds names no seed; give seeds like 0,1,2 or 0-3")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise UserError(f"seeds must be 0 or more, got {negative[0]}")
    twice = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if twice:
        raise UserError(f"seed {twice[0]} is given twice in --seeds; name each seed once")


def check_workdir(workdir: str, config: Config, data: dict) -> dict | None:
    """Before anything is written: refuse a workdir holding a single run or other files, and a
    multi-run of another recipe or data (what a single run's resume refuses); return the saved
    runs.json, if any."""
    if os.path.exists(os.path.join(workdir, wd.RUN_FILE)):
        raise UserError(
            f"workdir {workdir} holds a single run (run.json); --seeds needs a workdir of its own: "
            "pass another --workdir (nothing was touched)"
        )
    saved = read_runs(workdir)
    if saved is None:
        if os.path.isdir(workdir) and [n for n in os.listdir(workdir) if not n.startswith(".")]:
            raise UserError(
                f"workdir {workdir} holds files that are not a resnet_jax multi-run (no {RUNS_FILE}); "
                "pass another --workdir (nothing was touched)"
            )
        return None
    before = Config.from_json(json.dumps(saved["config"]))
    diff = [f for f in FIXED_FIELDS if f != "seed" and getattr(before, f) != getattr(config, f)]
    if diff:
        what = ", ".join(f"{f} {getattr(before, f)!r} (now {getattr(config, f)!r})" for f in diff)
        raise UserError(
            f"workdir {workdir} holds seeds of another recipe: {what}; rerun with the same settings "
            "to resume them, or pass another --workdir (nothing was deleted)"
        )
    wd.check_data(saved, data, workdir)
    return saved


def read_runs(workdir: str) -> dict | None:
    path = os.path.join(workdir, RUNS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); use another --workdir (nothing was deleted)") from None


def refuse_single_run(workdir: str):
    """A single run is refused in a multi-run's workdir (train.py without --seeds)."""
    saved = read_runs(workdir) if os.path.isdir(workdir) else None
    if saved is not None:
        seeds = ",".join(str(s) for s in saved["seeds"])
        raise UserError(
            f"workdir {workdir} holds a multi-run (seeds {seeds}); rerun it with --seeds {seeds}, "
            f"or train one seed in {seed_dir(workdir, saved['seeds'][0])} (nothing was touched)"
        )


def train_many(config: Config, workdir: str, seeds, dataset=None, *, verbosity: int = 1, **kwargs):
    """Train `seeds` of one recipe in `workdir`, each a complete run in `workdir/seed_<s>`
    (resuming what is unfinished, training nothing that finished); returns one (state, history)
    per seed. `kwargs` are train_and_evaluate's (model, optimizer, augment, callbacks, stop,
    summary); `dataset` is loaded once for all seeds when not given."""
    from resnet_jax import interrupt, report, tuning
    from resnet_jax.data import load_dataset
    from resnet_jax.loop import train_and_evaluate

    seeds = tuple(int(s) for s in seeds)
    check_seeds(seeds)
    path = os.path.abspath(os.path.expanduser(workdir))
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, verbose=verbosity > 0)
    config = dataclasses.replace(config, dataset=dataset.name, num_classes=dataset.num_classes)
    data = dataset.describe()
    saved = check_workdir(path, config, data)
    console = report.Console(verbosity)
    known = list(saved["seeds"]) if saved else []
    recipe = {k: v for k, v in json.loads(config.to_json()).items() if k != "seed"}
    record = {"seeds": known + [s for s in seeds if s not in known], "config": recipe, "data": data}
    if record != saved:
        wd.prepare(path)
        wd.write_atomic(os.path.join(path, RUNS_FILE), json.dumps(record, indent=1))
    tuning.split_for(config, dataset.image_shape, kwargs.get("model"))  # as train_and_evaluate
    how = tuning.started().seeds  # decided per platform, in resnet_jax.tuning
    console.line(f"Seeds {','.join(map(str, seeds))} of one recipe, {how}, in {path}")
    results = []
    stop = kwargs.pop("stop", None) or threading.Event()  # one stop request for every seed
    with interrupt.saving_on(stop, end_bar=console.bar):
        for i, seed in enumerate(seeds):
            console.line(f"=== seed {seed} ({i + 1} of {len(seeds)}) -> {seed_dir(path, seed)}")
            run = dataclasses.replace(config, seed=seed)
            results.append(
                train_and_evaluate(
                    run, seed_dir(path, seed), dataset, verbosity=verbosity, stop=stop, **kwargs
                )
            )
    summary = summarize(path, seeds)
    wd.write_atomic(os.path.join(path, SUMMARY_FILE), json.dumps(summary, indent=1))
    plot_seeds(path, seeds)
    for line in summary_lines(summary):
        console.line(line)
    return results


def summarize(workdir: str, seeds) -> dict:
    """summary.json: each seed's test result, best val_acc and time, then mean and sd."""
    rows = []
    for seed in seeds:
        _, info = wd.read_run(seed_dir(workdir, seed))
        with open(os.path.join(seed_dir(workdir, seed), wd.METRICS_FILE)) as f:
            history = [json.loads(line) for line in f]
        best = max(history, key=lambda r: r["val_acc"])
        rows.append(
            {
                "seed": seed,
                "test_accuracy": info["test"]["accuracy"],
                "test_loss": info["test"]["loss"],
                "best_val_acc": best["val_acc"],
                "best_epoch": best["epoch"],
                "epochs": len(history),
                "seconds": round(sum(r["seconds"] for r in history), 1),
            }
        )
    accuracy = [r["test_accuracy"] for r in rows]
    return {
        "seeds": list(seeds),
        "test_accuracy": accuracy,
        "mean": statistics.fmean(accuracy),
        "sd": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
        "n": len(accuracy),
        "runs": rows,
    }


def summary_lines(summary: dict) -> list[str]:
    """The console's closing table: one row per seed, then mean +- sd of the test accuracy."""
    from resnet_jax.report import table

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
    lines.append(
        f"Test accuracy over {summary['n']} seeds: {summary['mean']:.4f} ± {summary['sd']:.4f} (mean ± sd)"
    )
    return lines


def plot_seeds(workdir: str, seeds):
    """W/curves.png: each seed's val_acc by epoch (thin), their mean and ± sd band (markers)."""
    from resnet_jax.faults import writing
    from resnet_jax.report import curves_figure

    histories = []
    for seed in seeds:
        with open(os.path.join(seed_dir(workdir, seed), wd.METRICS_FILE)) as f:
            histories.append([json.loads(line) for line in f])
    fig = curves_figure([("mean of the seeds", histories)], f"val_acc of {len(seeds)} seeds")
    path = os.path.join(workdir, "curves.png")
    tmp = os.path.join(workdir, ".tmp-curves.png")
    with writing("curves.png", path):
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
