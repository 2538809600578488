"""Export for serving, for the seed model: the export's time and the artifact's size per format,
and a served prediction's time on this machine at batch 1 and 256 against rj.predict.

    python benchmarks/export.py [--preset seed] [--repeats 20] [--formats jax,saved_model] [--out FILE]

The state is a fresh one of the preset's model (its weights change no time); the served function
is loaded as a consumer loads it (jax.export.deserialize, tf.saved_model.load) and called on the
same images as rj.predict, each timed after one warm-up call (the median of `--repeats`). One
JSON line per figure.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

import resnet_jax as rj  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # compile, warm
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="seed")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--formats", default="jax,saved_model")
    p.add_argument("--out", help="append the JSON lines to this file too")
    args = p.parse_args()
    rj.configure()
    import jax

    config = rj.preset(args.preset)
    state = rj.create_train_state(config, jax.random.key(0), (32, 32, 3), 1563)
    rng = np.random.default_rng(0)
    images = {n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for n in (1, 256)}
    machine = {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "jax": jax.__version__}
    line = lambda **fields: emit({"preset": args.preset, **fields, **machine}, args.out)
    for batch, x in images.items():
        line(
            what="rj.predict",
            batch=batch,
            seconds=median_seconds(lambda x=x: rj.predict(state, x), args.repeats),
        )
    for fmt in args.formats.split(","):
        folder = os.path.join(tempfile.mkdtemp(), "served")
        began = time.perf_counter()
        record = rj.export(state, folder, format=fmt)
        line(what="export", format=fmt, seconds=time.perf_counter() - began, bytes=record["bytes"])
        call = served(fmt, folder)
        for batch, x in images.items():
            line(
                what="served",
                format=fmt,
                batch=batch,
                seconds=median_seconds(lambda x=x, call=call: call(x), args.repeats),
            )


def served(fmt: str, folder: str):
    """The exported function as a consumer loads it: images -> probabilities (numpy)."""
    if fmt == "jax":
        import jax

        function = jax.export.deserialize(open(os.path.join(folder, "model.jax"), "rb").read())
        return lambda x: np.asarray(function.call(x))
    from resnet_jax.data.tfds_data import tensorflow

    tf = tensorflow()
    signature = tf.saved_model.load(folder).signatures["serving_default"]
    return lambda x: signature(images=tf.constant(x))["probabilities"].numpy()


if __name__ == "__main__":
    main()
