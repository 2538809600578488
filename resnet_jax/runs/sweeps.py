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
import itertools
import json
import os
import shutil
import threading

from resnet_jax import process
from resnet_jax.checkpoint import run_files
from resnet_jax.config import (
    CHANGEABLE_FIELDS,
    FIELD_NAMES,
    FIXED_FIELDS,
    NOT_SWEPT,
    Config,
    coerce,
    field_types,
    unknown_field,
)
from resnet_jax.data.dataset import dataset_fields
from resnet_jax.errors import UserError
from resnet_jax.runs import interrupt
from resnet_jax.runs import summary as summaries
from resnet_jax.runs import workers as worker_processes
from resnet_jax.runs.summary import finished, label, render
from resnet_jax.runs.writer import Writer


def check_seeds(seeds):
    if not seeds:
        raise UserError("--seeds names no seed; give seeds like 0,1,2 or 0-3")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise UserError(f"seeds must be 0 or more, got {negative[0]}")
    twice = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if twice:
        raise UserError(f"seed {twice[0]} is given twice in --seeds; name each seed once")


def check_grid(grid) -> tuple:
    """The grid as ((field, values), ...): each field a Config field (a misspelling gets "did you
    mean"), sweepable and swept once, each value once, each value of the field's type (text read
    as its flag reads it). A single value where a list goes is a list of one; for a tuple field
    (stage_sizes), a tuple of items is one value and a list of tuples is several."""
    if isinstance(grid, dict):
        grid = grid.items()
    out, seen = [], set()
    for name, values in grid:
        if name not in FIELD_NAMES:
            raise unknown_field(name, "resnet_jax.Config (a sweep's grid)")
        if name in NOT_SWEPT:
            raise UserError(f"{name} cannot be swept: {NOT_SWEPT[name]}")
        if name in seen:
            raise UserError(f"{name} is swept twice; give all its values in one --sweep {name}=V1,V2")
        seen.add(name)
        out.append((name, tuple(coerce(name, v) for v in _values(name, values))))
        if not out[-1][1]:
            raise UserError(f"{name} is swept over no value; give one or more")
        values = out[-1][1]
        twice = [v for i, v in enumerate(values) if v in values[:i]]
        if twice:
            raise UserError(f"{name}={render(twice[0])} is given twice in the sweep; name each value once")
    return tuple(out)


def _values(name: str, values) -> list:
    """The values a grid gives a field: a list or tuple of them, or a single one."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, range)):
        return [values]
    if field_types()[name][0] is tuple and not any(isinstance(v, (list, tuple)) for v in values):
        return [values]  # (1, 1, 1) for stage_sizes: one value
    return list(values)


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
    sweep of another recipe (the fields a resume refuses: model, data, seed, batch, split), other
    swept fields or other data; return its runs.json, if any. What a resume applies (epochs, the
    rate, augmentation, ...) may change, as for a single run: every run applies it."""
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
    compared = [f for f in _recipe(config, swept) if f in FIXED_FIELDS]
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
    workers="auto",
    verbosity: int = 2,
    stop=None,
    worker_command=None,
    **kwargs,
) -> dict:
    """Train every setting of `grid` ({field: [values]}: their product, in the order given) for
    every seed, each a complete run in `workdir`, and return the summary (summary.json). The same
    call again trains nothing that finished; more values or seeds train only the new runs.
    `seeds` default to (config.seed,); `shard` (I, N) takes the I-th of every N runs; `workers`:
    how many runs train at once, each in a process of its own (auto: as many as the machine can
    feed, resnet_jax.runs.workers; 1: one after another, in this process; `worker_command`: the
    command they run, train.py's own for the command line); `kwargs` are train_and_evaluate's
    (model, optimizer, augment, callbacks, summary)."""
    args = (config, workdir, grid, seeds, dataset, shard, verbosity, stop, kwargs)
    return _sweep(*args, states=False, workers=workers, argv=worker_command)[0]


def train_many(
    config: Config, workdir: str, seeds, dataset=None, *, workers="auto", verbosity: int = 2, **kwargs
):
    """Train `seeds` of one recipe in `workdir`, each a complete run in `workdir/seed_<s>` (a
    sweep of one setting); returns one (state, history) per seed. `workers` as `sweep`'s;
    `kwargs` are train_and_evaluate's."""
    stop = kwargs.pop("stop", None)
    args = (config, workdir, None, seeds, dataset, None, verbosity, stop, kwargs)
    return _sweep(*args, states=True, workers=workers)[1]


def _sweep(
    config, workdir, grid, seeds, dataset, shard, verbosity, stop, kwargs, states: bool, workers, argv=None
):
    """(summary, [(state, history)] of the runs this process trained, or restored when `states`)."""
    from resnet_jax.data import load
    from resnet_jax.runs.loop import train

    path = os.path.abspath(os.path.expanduser(workdir))
    if seeds is None:
        seeds = (config.seed,)
    seeds = tuple(coerce("seed", s) for s in (seeds if isinstance(seeds, (list, tuple, range)) else [seeds]))
    check_seeds(seeds)
    grid = check_grid(grid or ())
    every = settings(config, grid)  # each setting's Config checked before anything is written
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise UserError(f"shard must be (I, N) with 0 <= I < N, got {shard}")
    if dataset is None:
        dataset = load.for_config(config, verbose=verbosity > 0)
    config = dataclasses.replace(config, **dataset_fields(dataset))
    every = [(fields, dataclasses.replace(c, **dataset_fields(dataset))) for fields, c in every]
    data = dataset.describe()
    check_workdir(path, config, grid, data)
    process.setup()
    platform = process.current()
    writer = Writer(path, verbosity)
    _record(writer, path, config, grid, seeds, data)
    plan = Plan(path, grid, seeds, every)
    runs = plan.runs(shard)
    console = writer.console
    count = worker_processes.count(
        workers, platform, [c for _, c in every], dataset.image_shape, kwargs, len(runs)
    )
    what = f"Sweep of {len(every)} settings x " if grid else "Seeds of one recipe: "
    part = "" if shard is None else f" (shard {shard[0]} of {shard[1]})"
    seeds_text = ",".join(map(str, seeds))
    how = platform.runs if count == 1 else f"{count} at once (workers: processes sharing the machine)"
    console.line(f"{what}seeds {seeds_text}, {len(runs)} runs{part}, {how}, in {path}")
    stop = stop if stop is not None else threading.Event()
    if count > 1:  # the workers train; this process prints, then summarises
        if argv is None:
            data_file = worker_processes.dataset_file(dataset, path)
            argv = worker_processes.command(config, path, grid, seeds, data_file, shard, verbosity)
        with interrupt.saving_on(stop, end_bar=False):
            worker_processes.run(argv, count, console, stop)
        shutil.rmtree(os.path.join(path, ".workers"), ignore_errors=True)
        if states:  # each run's state and history, read back (they are finished)
            return _sweep(*(config, workdir, grid, seeds, dataset, shard, 0, stop, kwargs), True, 1)
    results, waiting = {}, []
    with interrupt.saving_on(stop, end_bar=console.bar):
        # the second pass: runs another process held and left unfinished (none with workers)
        for attempt in range(2 if count == 1 else 0):
            todo = runs if attempt == 0 else [r for r in waiting if not _agree(_up_to_date(r[2], r[1]))]
            waiting = []
            for i, (fields, run_config, folder) in enumerate(todo):
                name = ", ".join(filter(None, (label(fields), f"seed {run_config.seed}")))
                console.line(f"=== {name} ({i + 1} of {len(todo)}) -> {folder}")
                if not states and _agree(_up_to_date(folder, run_config)):  # nothing to train or read
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
            if not waiting or count > 1:
                break
    summary = summaries.write(writer, plan, config)
    return summary, [results[folder] for _, _, folder in runs if folder in results]


def _up_to_date(folder: str, config: Config) -> bool:
    """Whether the run in `folder` is finished with `config`'s settings (a resume would change
    none: a sweep rerun with more epochs trains them)."""
    if not finished(folder):
        return False
    saved, _ = run_files.read_run(folder)
    return not run_files.changed_settings(saved, config)


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
        recipe = _recipe(config, swept)
        before = saved.get("config") or {}
        changed = {k: [before[k], v] for k, v in recipe.items() if k in before and before[k] != v}
        changes = list(saved.get("changes") or [])
        if changed and [k for k in changed if k in CHANGEABLE_FIELDS]:  # applied to every run
            changes.append({"settings": {k: v for k, v in changed.items() if k in CHANGEABLE_FIELDS}})
        record = {
            "grid": merged,
            "seeds": old + [s for s in seeds if s not in old],
            "config": recipe,
            "data": data,
            **({"changes": changes} if changes else {}),
        }
        if record != saved:
            writer.json(run_files.SWEEP_FILE, record)
