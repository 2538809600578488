"""Run by test_parallel.py in a fresh process (device count and jax.distributed are per process):
train a tiny model for 2 epochs on fixed random data; process 0 writes history and state. With
`seeds`, the run is seed 0 of a two-seed multi-run (rj.train_many), and every process records
the files it writes in the workdir (an audit hook: opens for writing, renames) beside `out`."""

import json
import os
import sys

import jax
import numpy as np
from conftest import random_dataset

import resnet_jax as rj
from resnet_jax.device import distributed, parallel, programs

out, workdir, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
seeds = "seeds" in sys.argv[4:]
args = [a for a in sys.argv[4:] if a != "seeds"]
if args:  # coordinator num_processes process_id
    distributed.initialize(args[0], int(args[1]), int(args[2]), timeout_s=60)

writes = []


def audit(event, arguments):
    """The files this process writes: opened for writing (open(), os.open) or renamed onto."""
    if event == "open" and isinstance(arguments[0], str):
        path, mode, flags = arguments
        if (mode and any(c in mode for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR):
            writes.append(("open", os.path.abspath(path)))
    elif event == "os.rename":
        writes.append(("rename", os.path.abspath(os.fsdecode(arguments[1]))))


config = rj.presets.tiny(batch_size=8, eval_batch_size=8, steps_per_call=3, dtype=dtype)
ds = random_dataset(n_train=62, n_test=20)  # 7 full batches + a partial batch of 6
if seeds:
    sys.addaudithook(audit)
    (state, history), _ = rj.train_many(config, workdir, [0, 1], ds, verbosity=1)
else:
    state, history = rj.train_and_evaluate(config, workdir, ds, verbosity=0)

mesh = parallel.make_mesh()
report = {"devices": mesh.size, "processes": jax.process_count(), "history": history}
# The train step the run compiled (batch 8, one step a call on the CPU) works on per-device
# shards: batch 8 / devices.
train_calls = {what[1]: exe for what, exe in programs.compiled("train_chunk").items()}
hlo = train_calls[(1, 8)].as_text()
report["per_device_batch_in_hlo"] = [b for b in (1, 2, 4, 8) if f"[{b},32,32,4]" in hlo]
if seeds:  # what each process wrote in the workdir, its checkpoints aside (orbax: every process)
    mine = [(how, path) for how, path in writes if path.startswith(os.path.abspath(workdir))]
    mine = [(how, os.path.relpath(path, workdir)) for how, path in mine if "/checkpoints" not in path]
    with open(f"{out}.writes.{jax.process_index()}.json", "w") as f:
        json.dump(mine, f)
if jax.process_index() == 0:
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path({"params": state.params, "stats": state.batch_stats})
    }
    np.savez(out, **flat)
    with open(out + ".json", "w") as f:
        json.dump(report, f)
