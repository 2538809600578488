"""Compile once: train.py keeps its compiled programs in the user's cache directory, a second run of
the same shapes (another workdir, another process) compiles none of them and computes the same
numbers; JAX_COMPILATION_CACHE_DIR wins; --no-compilation_cache keeps nothing."""

import os

from conftest import ENV, TINY, metrics, train, without_seconds

from resnet_jax import cache


def entries(folder, programs=("jit__train_chunk", "jit__evaluate", "jit_init")):
    """The cached programs that cost a run its compile time: the train calls, the evaluation, the
    initialisation (small helpers vary with how many steps a call ran, which follows the load)."""
    return {n for n in os.listdir(folder) if n.startswith(programs)} if os.path.isdir(folder) else set()


def test_a_second_run_of_the_same_shapes_compiles_nothing(archive, tmp_path):
    env = dict(ENV, XDG_CACHE_HOME=str(tmp_path / "home-cache"))
    folder = tmp_path / "home-cache" / "resnet_jax" / "xla"
    train("--workdir", str(tmp_path / "a"), "--data_dir", archive, "--epochs", "2", *TINY, env=env)
    first = entries(folder)
    assert any(n.startswith("jit__train_chunk") for n in first) and any(
        n.startswith("jit__evaluate") for n in first
    )
    train("--workdir", str(tmp_path / "b"), "--data_dir", archive, "--epochs", "2", *TINY, env=env)
    assert entries(folder) == first  # every program the run needed came from the cache
    assert without_seconds(metrics(tmp_path / "a")) == without_seconds(metrics(tmp_path / "b"))

    # Where a process's programs go, seen on a cheaper process: run a's evaluation (--eval_only
    # compiles the same evaluation program, found in `folder` unless the setting is obeyed).
    own = tmp_path / "jax-cache"
    env_jax = dict(env, JAX_COMPILATION_CACHE_DIR=str(own))
    train("--workdir", str(tmp_path / "a"), "--eval_only", env=env_jax)
    assert entries(own) and entries(folder) == first  # JAX's own setting wins

    off = dict(ENV, XDG_CACHE_HOME=str(tmp_path / "off-cache"))
    train("--workdir", str(tmp_path / "a"), "--eval_only", "--no-compilation_cache", env=off)
    assert not entries(tmp_path / "off-cache" / "resnet_jax" / "xla")
    train("--workdir", str(tmp_path / "a"), "--eval_only", env=off)  # the control: this one keeps it
    assert entries(tmp_path / "off-cache" / "resnet_jax" / "xla")


def test_where_the_cache_lives():
    assert cache.home({"XDG_CACHE_HOME": "/x"}) == "/x/resnet_jax"
    assert cache.home({}).endswith(os.path.join(".cache", "resnet_jax"))
    assert cache.compilation_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/resnet_jax/xla"
    assert cache.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j", "XDG_CACHE_HOME": "/x"}) == "/j"
    assert cache.compilation_cache_dir({"RESNET_JAX_COMPILATION_CACHE": "0"}) is None
    assert cache.compilation_cache_dir({}, enabled=False) is None
