"""A notebook's run end to end, resnet_jax against Keras 3, each in a fresh process with nothing set
by the user: from the call to the test accuracy.

    python benchmarks/notebook_e2e.py [--repeats 2] [--backends tensorflow,jax] [--cache cold] [--out FILE]

The data: 20,000 + 2,000 images of 28x28x1 (scikit-learn's digits, scaled up and placed at random
offsets, so both sides learn something real); the model: 16 filters, blocks 1,1,1; batch 64; 5
epochs; shift 0.1 + flip augmentation. resnet_jax: `import resnet_jax as rj;
rj.train_and_evaluate(...)` (no configure, no environment variable). Keras 3: the same model built,
compiled, `fit` on ImageDataGenerator, `evaluate`. Interleaved; one JSON line per run.
resnet_jax's persistent compilation cache is on by default: `--cache cold` (the default) gives each
of its runs an empty cache directory (a first-time user), `--cache warm` the cache the previous
repeat left (a later experiment of the same shapes, in a new process).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

from common import emit

HERE = os.path.dirname(os.path.abspath(__file__))

DATA = textwrap.dedent("""
    import numpy as np
    from sklearn.datasets import load_digits
    def make(n, seed):
        d = load_digits(); rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(d.images), n)
        big = np.kron(d.images[pick], np.ones((3, 3))) * (255 / 16)  # 24x24
        out = np.zeros((n, 28, 28, 1), np.uint8)
        dy, dx = rng.integers(0, 5, n), rng.integers(0, 5, n)
        for i in range(n):
            out[i, dy[i]:dy[i] + 24, dx[i]:dx[i] + 24, 0] = big[i].round()
        return out, d.target[pick]
    x, y = make(20000, 0); xt, yt = make(2000, 1)
""")

RESNET_JAX = DATA + textwrap.dedent("""
    import json, sys, time
    import resnet_jax as rj
    dataset = rj.Dataset(x, y, xt, yt, num_classes=10)
    config = rj.Config(num_filters=16, stage_sizes=(1, 1, 1), batch_size=64, epochs=5)
    start = time.perf_counter()
    state, history = rj.train_and_evaluate(config, sys.argv[1], dataset, verbosity=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"side": "resnet_jax " + rj.__version__, "seconds": round(seconds, 1),
                      "test_accuracy": history[-1]["val_acc"]}))
""")

KERAS = DATA + textwrap.dedent("""
    import json, sys, time
    import keras
    from keras_baseline import build
    from keras_preprocessing.image import ImageDataGenerator
    mean = x.mean(0) / 255
    start = time.perf_counter()
    xf, xtf = x.astype("float32") / 255 - mean, xt.astype("float32") / 255 - mean
    model = build(keras, 16, (1, 1, 1), 10, input_shape=(28, 28, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-3, epsilon=1e-7),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    gen = ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True,
                             fill_mode="nearest")
    model.fit(gen.flow(xf, y, batch_size=64), epochs=5, verbose=0)
    loss, acc = model.evaluate(xtf, yt, batch_size=1000, verbose=0)
    seconds = time.perf_counter() - start
    print(json.dumps({"side": f"keras {keras.__version__} ({keras.backend.backend()})",
                      "seconds": round(seconds, 1), "test_accuracy": acc}))
""")


def run(code, env, *args):
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=HERE, delete=False) as f:
        f.write(code)
    try:
        proc = subprocess.run(
            [sys.executable, f.name, *args], capture_output=True, text=True, env=env, cwd=HERE
        )
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        sys.exit(f"run failed: {proc.stderr.strip().splitlines()[-3:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--backends", default="tensorflow,jax", help="Keras backends to run")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold", help="resnet_jax's compilation cache")
    p.add_argument("--out")
    a = p.parse_args()
    plain = {
        k: v for k, v in os.environ.items() if not k.startswith(("RESNET_JAX", "GLIBC_TUNABLES", "XLA_FLAGS"))
    }
    plain.update(TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    warm = tempfile.mkdtemp()
    for r in range(a.repeats):
        env = dict(plain, XDG_CACHE_HOME=tempfile.mkdtemp() if a.cache == "cold" else warm)
        line = {"what": "notebook_e2e", "repeat": r, "cache": a.cache}
        emit({**line, **run(RESNET_JAX, env, tempfile.mkdtemp())}, a.out)
        for backend in a.backends.split(","):
            emit(
                {"what": "notebook_e2e", "repeat": r, **run(KERAS, dict(plain, KERAS_BACKEND=backend))}, a.out
            )


if __name__ == "__main__":
    main()
