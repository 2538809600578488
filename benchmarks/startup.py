"""Where train.py's start goes: the seconds from `python train.py` to its first train step, by phase.

    python benchmarks/startup.py [--repeats 2] [--cache cold|warm|both] [--compile_early on,off]
                                 [--out FILE] -- TRAIN_FLAGS...

Each run is a fresh process (`train.py TRAIN_FLAGS --workdir <new temp dir>`) whose phases are
timed by wrapping resnet_jax's functions of that name (imports, the platform, the data, the
fingerprint, the parts, the state, the device copy, the compile); it exits when the first epoch
starts. `--cache cold`: an empty compilation cache (a first run), `warm`: the cache the cold run
left (a second run of the same shapes), `both`: cold then warm, interleaved over the repeats. The
data cache (a decoded folder) is whatever the machine has: run once before to time it warm. One
JSON line per run: `to_first_epoch_s`, `imports_s`, and each phase's seconds (a phase that runs
on a thread alongside others is timed on its own clock, so the phases can add up to more).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import emit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (module, function): timed wherever they exist; a name this version lacks is skipped.
PHASES = (
    ("resnet_jax.process", "setup"),
    ("resnet_jax.process", "current"),
    ("resnet_jax.runs.loop", "load_dataset"),
    ("resnet_jax.checkpoint.run_files", "describe_data"),
    ("resnet_jax.model.parts", "resolve"),
    ("resnet_jax.checkpoint", "template"),
    ("resnet_jax.runs.loop", "_start"),
    ("resnet_jax.model.steps", "init_state"),
    ("resnet_jax.device.data", "to_device"),
    ("resnet_jax.device.programs", "compile_epoch"),  # on a thread when the compile begins early
    ("resnet_jax.device.programs", "Programs.finish"),  # the wait for it (and any compile left)
)


def child(argv):
    """In the timed process: wrap the phases, run train.py's main, exit at the first epoch."""
    began = float(os.environ["STARTUP_T0"])
    import importlib

    from resnet_jax import cli
    from resnet_jax.runs import loop

    imports = time.time() - began
    seconds = {}

    def timed(fn, name):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t

        return run

    for module, name in PHASES:
        owner = importlib.import_module(module)
        *path, attr = name.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, attr):
            setattr(owner, attr, timed(getattr(owner, attr), name))

    def first_epoch(*args, **kwargs):
        import jax

        total = time.time() - began
        line = {"imports_s": round(imports, 2), "to_first_epoch_s": round(total, 2)}
        line["phases"] = {k: round(v, 2) for k, v in seconds.items()}
        line["device_kind"] = jax.devices()[0].device_kind
        print("STARTUP " + json.dumps(line), flush=True)
        os._exit(0)

    loop.Epochs.train = first_epoch
    if (early := os.environ.get("STARTUP_COMPILE_EARLY")) in ("on", "off"):  # else the platform's
        import dataclasses

        from resnet_jax import tuning

        decide = tuning.decide
        tuning.decide = lambda *a, **k: dataclasses.replace(decide(*a, **k), compile_early=early == "on")
    sys.argv = ["train.py"] + argv
    cli.main()


def run_once(flags, cache_dir, cache, early="platform"):
    work = tempfile.mkdtemp(prefix="startup-")
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir, STARTUP_COMPILE_EARLY=early)
    env["STARTUP_T0"] = repr(time.time())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, HERE, env.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--", *flags, "--workdir", work]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(work, ignore_errors=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("STARTUP ")]
    if not lines:
        raise SystemExit(
            f"the timed start failed (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        )
    line = json.loads(lines[-1][len("STARTUP ") :])
    return {"what": "startup", "cache": cache, "compile_early": early, **line, "flags": " ".join(flags)}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cache", choices=("cold", "warm", "both"), default="both")
    p.add_argument("--out", help="append the JSON lines to this file too")
    p.add_argument(
        "--compile_early",
        default="platform",
        help="on, off, platform (tuning's decision), or on,off: each in turn, interleaved",
    )
    p.add_argument("flags", nargs="*", help="train.py's flags (after --)")
    a = p.parse_args()
    for _ in range(a.repeats):
        for early in a.compile_early.split(","):
            cache_dir = tempfile.mkdtemp(prefix="startup-xla-")
            kinds = ("cold", "warm") if a.cache == "both" else (a.cache,)
            if a.cache == "warm":  # fill the cache first, untimed
                run_once(a.flags, cache_dir, "fill", early)
            for kind in kinds:
                emit(run_once(a.flags, cache_dir, kind, early), a.out)
            shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
