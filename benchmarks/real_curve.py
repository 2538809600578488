"""The seed recipe's learning curve on real CIFAR-10, resnet_jax beside Keras 3, several seeds each.

    python benchmarks/real_curve.py --data_dir ../shared/data/cifar10-jpeg75.tar.gz \\
        [--epochs 2] [--seeds 0,1,2] [--sides resnet_jax,keras] [--out FILE]
        [--lr_epochs 8 --lr_factors 0.1] [--num_filters 8]   # both sides alike
    python benchmarks/real_curve.py --summarize FILE [FILE ...]

Runs interleaved (resnet_jax seed 0, Keras seed 0, resnet_jax seed 1, ...) so that a drift of the
machine touches both sides alike: resnet_jax as `train.py` (its console, metrics.jsonl), Keras as
`benchmarks/keras_real.py` (`fit` + ImageDataGenerator, the bench extra). One JSON line per run
and epoch: side, seed, epoch, acc, val_acc, loss, val_loss, seconds. Then a summary per epoch: each
side's val_acc mean, spread and range, and whether the two differ beyond the seed-to-seed spread
(Welch's t-test, and the difference against the larger of the two standard deviations).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from common import emit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def shared_flags(a):
    """What both sides get alike: the rate steps (the seed log's unless --lr_epochs/--lr_factors are
    given) and the width (--num_filters, 32 unless given)."""
    keys = ("lr_epochs", "lr_factors", "num_filters")
    return [f for k in keys if getattr(a, k) for f in (f"--{k}", str(getattr(a, k)))]


def common(program, a, seed):
    """A side's command: its program, the data, the epochs, the seed, the shared flags."""
    data = ["--data_dir", a.data_dir, "--epochs", str(a.epochs), "--seed", str(seed)]
    return [sys.executable, program, *data, *shared_flags(a)]


def resnet_jax_run(a, seed):
    workdir = tempfile.mkdtemp(prefix=f"real_curve_{seed}_")
    flags = ["--workdir", workdir, "--verbose", "1", *a.train_flags.split()]
    cmd = common(os.path.join(ROOT, "train.py"), a, seed) + flags
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train.py failed: {proc.stderr.strip().splitlines()[-1:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            yield {
                "side": "resnet_jax",
                "seed": seed,
                **{k: r[k] for k in ("epoch", "acc", "val_acc", "loss", "val_loss", "seconds")},
            }


def keras_run(a, seed):
    cmd = common(os.path.join(HERE, "keras_real.py"), a, seed) + ["--backend", a.keras_backend]
    # Each epoch's line is passed on as keras_real.py prints it (a run stopped early keeps its
    # epochs); its stderr goes to a temporary file for the failure message.
    with tempfile.TemporaryFile("w+") as err:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE) as proc:
            for line in proc.stdout:
                if line.startswith("{"):
                    yield {**json.loads(line), "side": "keras", "backend": a.keras_backend}
        if proc.returncode != 0:
            err.seek(0)
            sys.exit(f"keras_real.py failed: {err.read().strip().splitlines()[-1:]}")


def summarize(rows):
    """Per epoch: each side's val_acc (mean, sd, range, n) and whether they differ beyond the spread."""
    out = []
    sides = sorted({r["side"] for r in rows})
    for epoch in sorted({r["epoch"] for r in rows}):
        by = {s: [r["val_acc"] for r in rows if r["side"] == s and r["epoch"] == epoch] for s in sides}
        by = {s: v for s, v in by.items() if v}  # a run cut short has no line for the later epochs
        line = {"what": "summary", "epoch": epoch}
        for s, v in by.items():
            line[s] = {
                "n": len(v),
                "val_acc_mean": round(statistics.mean(v), 4),
                "val_acc_sd": round(statistics.stdev(v), 4) if len(v) > 1 else None,
                "val_acc_range": [round(min(v), 4), round(max(v), 4)],
                "acc_mean": round(
                    statistics.mean(r["acc"] for r in rows if r["side"] == s and r["epoch"] == epoch), 4
                ),
            }
        if len(by) == 2 and all(len(v) > 1 for v in by.values()):
            a, b = (by[s] for s in sides)
            diff = statistics.mean(a) - statistics.mean(b)
            spread = max(statistics.stdev(a), statistics.stdev(b))
            line["difference"] = round(diff, 4)
            line["beyond_spread"] = abs(diff) > spread
            try:
                from scipy import stats

                line["welch_p"] = round(float(stats.ttest_ind(a, b, equal_var=False).pvalue), 4)
            except ImportError:
                pass
        out.append(line)
    return out


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--data_dir", help="CIFAR-10 as an image folder or archive (train.py's --data_dir)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sides", default="resnet_jax,keras")
    p.add_argument("--keras_backend", default="tensorflow")
    p.add_argument("--lr_epochs", help="rate boundaries in epochs for both sides, e.g. 4 (seed: 26,36,46)")
    p.add_argument("--lr_factors", help="their factors for both sides, e.g. 0.1 (seed: 0.1,0.01,0.5)")
    p.add_argument("--num_filters", type=int, help="a narrower seed model on both sides (seed: 32)")
    p.add_argument("--train_flags", default="", help="extra train.py flags for the resnet_jax side")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--summarize", nargs="+", metavar="FILE", help="only summarize lines written before")
    a = p.parse_args()
    if a.summarize:
        rows = [json.loads(x) for f in a.summarize for x in open(f) if x.strip()]
        for line in summarize([r for r in rows if r.get("what") != "summary"]):
            emit(line)
        return
    if not a.data_dir:
        p.error("--data_dir is required (or --summarize FILE)")
    a.data_dir = os.path.abspath(a.data_dir)  # keras_real.py runs in benchmarks/
    rows = []
    runs = {"resnet_jax": resnet_jax_run, "keras": keras_run}
    for seed in (int(s) for s in a.seeds.split(",")):
        for side in a.sides.split(","):
            for row in runs[side](a, seed):
                rows.append(row)
                emit(row, a.out)
    for line in summarize(rows):
        emit(line, a.out)


if __name__ == "__main__":
    main()
