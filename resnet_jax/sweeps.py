"""Sweeps: every setting of a grid over several seeds, each (setting, seed) a complete run, and a
verdict on whether a setting helps. `--seeds` alone is a sweep of one setting.

    W/runs.json              what the sweep is: the swept fields and their values, the seeds, the
                             recipe its runs share, the data
    W/<setting>/seed_<s>/    exactly the workdir `--seed s` with the setting's flags would make
                             (a sweep of one setting: W/seed_<s>/); resnet_jax.restore reads it
    W/summary.json           per setting: mean ± sd of its runs' test accuracy and best val_acc,
                             the difference from the first setting with a 95 % interval (Welch's
                             t); the setting chosen on validation, and what validated
    W/curves.png             each setting's mean val_acc by epoch, ± sd

Many processes can share one sweep (two terminals, a cluster's job array over a shared disk):
each run is claimed through its own workdir's lock, so none is trained twice; `shard` (I, N)
splits the runs statically (task I takes every N-th) where the file system's locks cannot be
trusted. Every process writes the summary at its end, under W's lock, from what is finished
then: the last one to finish writes the complete one. How the runs execute is the platform's
decision (resnet_jax.tuning.Platform.runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import statistics
import threading

from resnet_jax import interrupt, run_files, tuning
from resnet_jax.config import NO_NUMBER, NOT_SWEPT, Config, parse_value
from resnet_jax.console import table
from resnet_jax.errors import UserError
from resnet_jax.writer import Writer

SUMMARY_FILE = "summary.json"
TUPLE_SEPARATOR = ":"  # --sweep stage_sizes=1:1:1,3:3:2


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


def parse_grid(texts) -> tuple:
    """`--sweep FIELD=V1,V2` flags -> ((field, (values...)), ...), values as the field's flag
    reads them (tuples with ':' between items). One line for a flag that cannot be one."""
    fields = {f.name for f in dataclasses.fields(Config)}
    grid = []
    for text in texts:
        if "=" not in text:
            raise UserError(f"--sweep takes FIELD=V1,V2,..., got {text!r} (no '=')")
        name, values = (part.strip() for part in text.split("=", 1))
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1)
            hint = f"; did you mean {close[0]}?" if close else " (train.py --help lists the fields)"
            raise UserError(f"--sweep {text}: {name!r} is not a setting{hint}")
        texts_of = [v.strip() for v in values.split(",")]
        if not values.strip() or "" in texts_of:
            raise UserError(f"--sweep {text}: give {name} one or more values, like {name}=V1,V2")
        try:
            parsed = tuple(parse_value(name, v, TUPLE_SEPARATOR) for v in texts_of)
        except ValueError as e:
            raise UserError(f"--sweep {text}: {e}") from None
        grid.append((name, parsed))
    return check_grid(grid)


def check_grid(grid) -> tuple:
    """The grid as ((field, values), ...): each field sweepable and swept once, each value once."""
    grid = tuple((name, tuple(values)) for name, values in (grid.items() if isinstance(grid, dict) else grid))
    seen = set()
    for name, values in grid:
        if name in NOT_SWEPT:
            raise UserError(f"{name} cannot be swept: {NOT_SWEPT[name]}")
        if name in seen:
            raise UserError(f"{name} is swept twice; give all its values in one --sweep {name}=V1,V2")
        seen.add(name)
        if not values:
            raise UserError(f"{name} is swept over no value; give one or more")
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise UserError(f"{name}={render(twice[0])} is given twice in the sweep; name each value once")
    return grid


def settings(config: Config, grid) -> list[tuple[dict, Config]]:
    """[(fields, Config)] of every setting of the grid, in grid order (the product of the values
    in the order given); each Config checked, so a value its field refuses is one line."""
    found = []
    for values in itertools.product(*(v for _, v in grid)):
        fields = dict(zip((name for name, _ in grid), values))
        try:
            found.append((fields, dataclasses.replace(config, **fields)))
        except UserError as e:
            raise UserError(f"the sweep's setting {label(fields)}: {e}") from None
    return found


def render(value) -> str:
    """A value as a setting's folder names it: 0.001, 3-3-2, True."""
    if isinstance(value, tuple):
        return "-".join(render(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def label(fields: dict) -> str:
    """A setting's name, and its folder: learning_rate=0.001,num_filters=16 ('' for no grid)."""
    return ",".join(f"{k}={render(v)}" for k, v in fields.items())


def run_dir(workdir: str, fields: dict, seed: int) -> str:
    return os.path.join(workdir, label(fields), f"seed_{seed}")


def seed_dir(workdir: str, seed: int) -> str:
    """A run of a sweep of one setting (train.py --seeds): W/seed_<s>."""
    return os.path.join(workdir, f"seed_{seed}")


def _recipe(config: Config, swept) -> dict:
    """What every run of a sweep shares: the Config but the seed and the swept fields."""
    raw = json.loads(config.to_json())
    return {k: v for k, v in raw.items() if k != "seed" and k not in swept}


def check_workdir(workdir: str, config: Config, grid, data: dict) -> dict | None:
    """Before anything is written: refuse a workdir holding a single run or other files, and a
    sweep of another recipe, other swept fields or other data; return its runs.json, if any."""
    if os.path.exists(os.path.join(workdir, run_files.RUN_FILE)):
        raise UserError(
            f"workdir {workdir} holds a single run (run.json); --seeds and --sweep need a workdir of "
            "their own: pass another --workdir (nothing was touched)"
        )
    saved = read_sweep(workdir)
    if saved is None:
        if os.path.isdir(workdir) and [n for n in os.listdir(workdir) if not n.startswith(".")]:
            raise UserError(
                f"workdir {workdir} holds files that are not a resnet_jax sweep (no "
                f"{run_files.SWEEP_FILE}); pass another --workdir (nothing was touched)"
            )
        return None
    swept = [name for name, _ in grid]
    before = [name for name, _ in saved.get("grid") or []]
    if before != swept:
        was = ", ".join(before) or "nothing (seeds only)"
        raise UserError(
            f"workdir {workdir} holds a sweep of {was}; this one sweeps {', '.join(swept) or 'nothing'}: "
            "pass another --workdir (nothing was touched)"
        )
    saved_config = Config.from_json(json.dumps({**saved["config"], "seed": 0}))
    compared = [f for f in _recipe(config, swept) if f not in NO_NUMBER]
    what, kind = ("seeds", "another recipe") if not swept else ("a sweep", "another recipe")
    run_files.check_compatible(saved_config, config, workdir, fields=compared, what=what, kind=kind)
    run_files.check_data(saved, data, workdir)
    return saved


def read_sweep(workdir: str) -> dict | None:
    path = os.path.join(workdir, run_files.SWEEP_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); use another --workdir (nothing was deleted)") from None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep's runs: every (setting, seed), in order; each a complete run in its folder."""

    workdir: str
    grid: tuple
    seeds: tuple
    settings: list  # [(fields, Config)]

    def runs(self, shard=None):
        """[(fields, Config of the run, its folder)], setting by setting (`shard` (I, N): the I-th
        of every N)."""
        every = [
            (fields, dataclasses.replace(config, seed=seed), self.folder(fields, seed))
            for fields, config in self.settings
            for seed in self.seeds
        ]
        return every if shard is None else every[shard[0] :: shard[1]]

    def folder(self, fields: dict, seed: int) -> str:
        return run_dir(self.workdir, fields, seed) if self.grid else seed_dir(self.workdir, seed)


def sweep(
    config: Config,
    workdir: str,
    grid=None,
    seeds=None,
    dataset=None,
    *,
    shard=None,
    verbosity: int = 1,
    stop=None,
    **kwargs,
) -> dict:
    """Train every setting of `grid` ({field: [values]}: their product, in the order given) for
    every seed, each a complete run in `workdir`, and return the summary (summary.json). The same
    call again trains nothing that finished; more values or seeds train only the new runs.
    `seeds` default to (config.seed,); `shard` (I, N) takes the I-th of every N runs; `kwargs`
    are train_and_evaluate's (model, optimizer, augment, callbacks, summary)."""
    return _sweep(config, workdir, grid, seeds, dataset, shard, verbosity, stop, kwargs, states=False)[0]


def train_many(config: Config, workdir: str, seeds, dataset=None, *, verbosity: int = 1, **kwargs):
    """Train `seeds` of one recipe in `workdir`, each a complete run in `workdir/seed_<s>` (a
    sweep of one setting); returns one (state, history) per seed. `kwargs` are
    train_and_evaluate's."""
    stop = kwargs.pop("stop", None)
    return _sweep(config, workdir, None, seeds, dataset, None, verbosity, stop, kwargs, states=True)[1]


def _sweep(config, workdir, grid, seeds, dataset, shard, verbosity, stop, kwargs, states: bool):
    """(summary, [(state, history)] of the runs this process trained, or restored when `states`)."""
    from resnet_jax.data import load_dataset
    from resnet_jax.loop import train

    path = os.path.abspath(os.path.expanduser(workdir))
    seeds = (config.seed,) if seeds is None else tuple(int(s) for s in seeds)
    check_seeds(seeds)
    grid = check_grid(grid or ())
    every = settings(config, grid)  # each setting's Config checked before anything is written
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise UserError(f"shard must be (I, N) with 0 <= I < N, got {shard}")
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, verbose=verbosity > 0)
    config = dataclasses.replace(config, dataset=dataset.name, num_classes=dataset.num_classes)
    every = [
        (fields, dataclasses.replace(c, dataset=dataset.name, num_classes=dataset.num_classes))
        for fields, c in every
    ]
    data = dataset.describe()
    check_workdir(path, config, grid, data)
    tuning.setup()
    platform = tuning.current()
    writer = Writer(path, verbosity)
    _record(writer, path, config, grid, seeds, data)
    plan = Plan(path, grid, seeds, every)
    runs = plan.runs(shard)
    console = writer.console
    what = f"Sweep of {len(every)} settings x " if grid else "Seeds of one recipe: "
    part = "" if shard is None else f" (shard {shard[0]} of {shard[1]})"
    seeds_text = ",".join(map(str, seeds))
    console.line(f"{what}seeds {seeds_text}, {len(runs)} runs{part}, {platform.runs}, in {path}")
    stop = stop if stop is not None else threading.Event()
    results, waiting = {}, []
    with interrupt.saving_on(stop, end_bar=console.bar):
        for attempt in range(2):  # the second pass: runs another process held and left unfinished
            todo = runs if attempt == 0 else [r for r in waiting if not _agree(_finished(r[2]))]
            waiting = []
            for i, (fields, run_config, folder) in enumerate(todo):
                name = ", ".join(filter(None, (label(fields), f"seed {run_config.seed}")))
                console.line(f"=== {name} ({i + 1} of {len(todo)}) -> {folder}")
                if not states and _agree(_finished(folder)):  # nothing to train: not even its state read
                    console.line(f"Run in {folder} is finished.")
                    continue
                with _claim(folder) as mine:
                    if not mine:
                        console.line(f"{folder} is in use by another process: left to it")
                        waiting.append((fields, run_config, folder))
                        continue
                    results[folder] = train(
                        run_config,
                        folder,
                        dataset,
                        platform=platform,
                        verbosity=verbosity,
                        stop=stop,
                        locked=True,
                        **kwargs,
                    )
            if not waiting:
                break
    summary = _summarize_and_report(writer, plan, config)
    return summary, [results[folder] for _, _, folder in runs if folder in results]


def _finished(folder: str) -> bool:
    try:
        saved = run_files.read_run(folder)
    except UserError:
        return False
    return saved is not None and saved[1].get("test") is not None


def _agree(value: bool) -> bool:
    """Process 0's `value` on every process of a multi-host run (they go through a sweep together)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


@contextlib.contextmanager
def _claim(folder: str):
    """Whether this process may train the run in `folder`: its lock taken (by process 0, for every
    process of a multi-host run) and held inside, or False when another process holds it."""
    import jax

    lock = contextlib.ExitStack()
    mine = True
    if jax.process_index() == 0:
        run_files.prepare(folder)
        try:
            lock.enter_context(run_files.Lock(folder))
        except run_files.InUse:
            mine = False
    with lock:
        yield _agree(mine)


def _record(writer: Writer, path: str, config: Config, grid, seeds, data: dict):
    """runs.json: what the sweep is, grown by what this call asks (under W's lock: processes
    sharing the sweep may ask for more values or seeds at once)."""
    swept = [name for name, _ in grid]
    if not writer.primary:
        return
    run_files.prepare(path)
    with run_files.Lock(path, wait=True):
        saved = read_sweep(path) or {}
        known = {name: list(values) for name, values in saved.get("grid") or []}
        merged = []
        for name, values in grid:
            have = [tuple(v) if isinstance(v, list) else v for v in known.get(name, [])]
            merged.append([name, have + [v for v in values if v not in have]])
        old = list(saved.get("seeds") or [])
        record = {
            "grid": merged,
            "seeds": old + [s for s in seeds if s not in old],
            "config": _recipe(config, swept),
            "data": data,
        }
        if record != saved:
            writer.json(run_files.SWEEP_FILE, record)


def _summarize_and_report(writer: Writer, plan: Plan, config: Config) -> dict:
    """summary.json and curves.png from the runs finished now (under W's lock), and the console's
    closing table."""
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


def _figure(plan: Plan, histories: dict):
    from resnet_jax.plots import curves_figure

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
    if not _finished(folder):
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
    """The difference of means b - a with a 95 % interval by Welch's t (unequal variances);
    no interval when either has fewer than two values."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "ci95": None, "why": "a setting with one seed: no interval can be given"}
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci95": [diff, diff], "why": "every seed gave the same accuracy"}
    from scipy import stats

    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.975, df)) * se
    return {"diff": diff, "ci95": [diff - half, diff + half], "df": df}


def summarize(plan: Plan, config: Config) -> tuple[dict, dict]:
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
