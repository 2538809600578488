"""Learning on real data: scikit-learn's digits through train_and_evaluate, restore and predict."""

import re

import numpy as np
import pytest
from digits import DIGITS, digits_dataset

import resnet_jax as rj

pytestmark = pytest.mark.slow  # end-to-end: the whole file


def test_digits_reach_95_percent_and_predict_agrees(tmp_path, compiled_as_users_compile):
    ds = digits_dataset(scale=1, channels=1)  # 8x8x1, as scikit-learn has them
    state, history = rj.train_and_evaluate(DIGITS, str(tmp_path / "digits"), ds, verbosity=0)
    assert history[-1]["val_acc"] >= 0.95, history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    for which, expected in (("latest", history[-1]["val_acc"]), ("best", max(h["val_acc"] for h in history))):
        restored = rj.restore(str(tmp_path / "digits"), which)
        probs = rj.predict(restored, ds.test_images)
        assert probs.shape == (len(ds.test_images), 10)
        np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
        assert np.mean(probs.argmax(1) == ds.test_labels) == pytest.approx(expected)


def test_readme_notebook_snippet_runs(tmp_path):
    """The README's notebook snippet, with its data and workdir pointed at small local files."""
    from cifar_files import write_cifar

    archive, _ = write_cifar(tmp_path / "data", rows=(16, 16, 16, 16, 16), test_rows=16)
    readme = open(__file__.rsplit("/tests/", 1)[0] + "/README.md").read()
    code = re.search(r"<!-- notebook -->\s*```python\n(.*?)```", readme, re.S).group(1)
    for old, new in (
        ('"../shared/data/cifar10-jpeg75.tar.gz"', f'"{archive}"'),
        ("subset(train=2000, test=500)", "subset(train=64, test=16)"),
        ('"runs/notebook"', f'"{tmp_path / "nb"}"'),
    ):
        assert old in code, old  # the snippet as the README shows it
        code = code.replace(old, new)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["probs"].shape == (8, 10)
    assert len(scope["history"]) == scope["config"].epochs
    # a mixed sample: the eight test images shown are not all of one class
    assert len(set(scope["small"].test_labels[:8].tolist())) > 1
