"""A small real dataset end to end: scikit-learn's digits (8x8 scaled to 32x32x3) with your own model
and with the seed model, through train_and_evaluate as a notebook calls it.

    python benchmarks/digits.py [--epochs 16] [--out FILE]

One JSON line per model: parameters, seconds from the call to the result, final train and test
accuracy. The CNN is the BatchNorm-free one of the tests (tests/own_parts.py) with SGD on a cosine
schedule; the seed model is the Config's ResNet and recipe (rates stepped down at 3/4 of the run).
"""

import argparse
import functools
import os
import sys
import tempfile
import time

from jsonl import emit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--out")
    a = p.parse_args()
    from digits import digits_dataset
    from own_parts import CNN, sgd_cosine

    import resnet_jax as rj

    dataset = digits_dataset()
    base = rj.Config(epochs=a.epochs, flip=False, lr_epochs=(a.epochs * 3 // 4,), lr_factors=(0.1,))
    runs = {
        "CNN (yours: no BatchNorm, SGD + cosine)": dict(
            model=CNN(), optimizer=functools.partial(sgd_cosine, epochs=a.epochs)
        ),
        "seed ResNet (32 filters, blocks 3,3,2)": {},
    }
    for name, parts in runs.items():
        start = time.perf_counter()
        state, history = rj.train_and_evaluate(base, tempfile.mkdtemp(), dataset, verbosity=0, **parts)
        emit(
            {
                "what": "digits",
                "model": name,
                "parameters": sum(x.size for x in __import__("jax").tree.leaves(state.params)),
                "epochs": a.epochs,
                "seconds": round(time.perf_counter() - start, 1),
                "acc": round(history[-1]["acc"], 4),
                "test_acc": round(history[-1]["val_acc"], 4),
            },
            a.out,
        )


if __name__ == "__main__":
    main()
