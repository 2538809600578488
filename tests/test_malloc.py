"""glibc malloc set up for XLA:CPU in the process (resnet_jax.tuning): only on a CPU with glibc and
not opted out, once, before JAX starts; one line when JAX started first; results identical."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from resnet_jax import process, tuning

pytestmark = pytest.mark.slow  # end-to-end: the whole file

HERE = os.path.dirname(os.path.abspath(__file__))
GLIBC = ("glibc", "2.36")


def test_settings_only_where_they_apply():
    assert process.malloc_settings("cpu", GLIBC, {}) == process.MALLOC_SETTINGS
    assert process.malloc_settings("gpu", GLIBC, {}) == ()
    assert process.malloc_settings("tpu", GLIBC, {}) == ()
    assert process.malloc_settings("cpu", ("", ""), {}) == ()  # musl, macOS: not glibc
    for off in ("0", "off", "no"):
        assert process.malloc_settings("cpu", GLIBC, {process.MALLOC_ENV: off}) == ()
    assert dict(process.MALLOC_SETTINGS)[process.M_ARENA_MAX] == 1
    assert tuning.decide("cpu").malloc and not tuning.decide("gpu").malloc


# A child process: what happens to malloc, counted with glibc's own report (malloc_info: one
# <heap nr=...> per arena), after JAX has run a tiny training on two CPU threads.
CHILD = textwrap.dedent("""
    import ctypes, os, sys
    import numpy as np
    if sys.argv[1] == "jax-first":
        import jax; jax.devices()
    import resnet_jax as rj
    from resnet_jax import process
    if sys.argv[1] == "configure":
        print("configure:", rj.configure(rj.presets.tiny()).malloc, process.setup())
    rng = np.random.default_rng(0)
    ds = rj.Dataset(rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 32),
                    rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 8))
    state, _ = rj.train_and_evaluate(rj.presets.tiny(batch_size=8, epochs=1), sys.argv[2], ds, verbosity=0)
    print("done:", process.applied()["malloc"])
    libc = ctypes.CDLL(None)
    libc.open_memstream.restype = ctypes.c_void_p
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    print("arenas:", buf.value.decode().count("<heap nr="))
    np.save(sys.argv[3], np.concatenate([np.ravel(x) for x in __import__("jax").tree.leaves(state.params)]))
""")


def child(mode, tmp_path, name, **env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path / name), str(tmp_path / f"{name}.npy")],
        env=dict(os.environ, JAX_PLATFORMS="cpu", **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    return out, proc.stderr, np.load(tmp_path / f"{name}.npy")


@pytest.mark.skipif(not process.malloc_settings("cpu"), reason="malloc settings apply to glibc only")
def test_applied_once_before_jax_starts_and_results_are_identical(tmp_path):
    on, err_on, params_on = child("notebook", tmp_path, "on")
    assert on["done"] == "applied" and on["arenas"] == "1" and "note:" not in err_on
    off, _, params_off = child("notebook", tmp_path, "off", RESNET_JAX_MALLOC="0")
    assert off["done"] == "off" and int(off["arenas"]) > 1  # glibc's default: an arena per thread
    np.testing.assert_array_equal(params_on, params_off)  # malloc changes no number
    configured, _, _ = child("configure", tmp_path, "configured")
    assert configured["configure"] == "True None"  # applied by configure; the second call does nothing
    assert configured["done"] == "applied" and configured["arenas"] == "1"


@pytest.mark.skipif(not process.malloc_settings("cpu"), reason="malloc settings apply to glibc only")
def test_when_jax_started_first_one_line_says_how_to_get_them(tmp_path):
    late, err, _ = child("jax-first", tmp_path, "late")
    assert late["done"] == "late" and int(late["arenas"]) > 1
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "import resnet_jax" in notes[0] and "GLIBC_TUNABLES" in notes[0]
