"""Run by test_parallel.py in a fresh process (device count and jax.distributed are per process):
train a tiny model for 2 epochs on fixed random data; process 0 writes history and state."""

import json
import sys

import jax
import numpy as np
from conftest import random_dataset

import resnet_jax as rj
from resnet_jax import distributed, parallel, pipeline

out, workdir, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
if len(sys.argv) > 4:  # coordinator num_processes process_id
    distributed.initialize(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), timeout_s=60)

config = rj.tiny(batch_size=8, eval_batch_size=8, steps_per_call=3, dtype=dtype)
ds = random_dataset(n_train=62, n_test=20)  # 7 full batches + a partial batch of 6
state, history = rj.train_and_evaluate(config, workdir, ds, verbosity=0)

mesh = parallel.make_mesh()
report = {"devices": mesh.size, "processes": jax.process_count(), "history": history}
# The train step the run compiled (batch 8, one step a call on the CPU) works on per-device
# shards: batch 8 / devices.
train_calls = {key[1]: exe for key, exe in pipeline._COMPILED.items() if key[0][0] == "train_chunk"}
hlo = train_calls[(1, 8)].as_text()
report["per_device_batch_in_hlo"] = [b for b in (1, 2, 4, 8) if f"[{b},32,32,4]" in hlo]
if jax.process_index() == 0:
    flat = {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_leaves_with_path({"params": state.params, "stats": state.batch_stats})
    }
    np.savez(out, **flat)
    with open(out + ".json", "w") as f:
        json.dump(report, f)
