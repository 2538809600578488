"""Faults of the machine end like bad input: a full disk at each write a run makes, memory that
runs out. One line on stderr, exit status 3, no traceback, no complete checkpoint lost, and
after the fault is gone the same command resumes bit for bit."""

import os
import re
import shutil
import subprocess
import tempfile

import pytest
from conftest import ENV, TINY, assert_same_run, metrics, run_main, start, train, wait_for
from inject import install

import resnet_jax as rj

HERE = os.path.dirname(os.path.abspath(__file__))


def inject(site, workdir, archive, *extra, after=0):
    """train.py's main with `site`'s fault injected (tests/inject.py), in this process; the
    patches are undone when it returns."""
    with pytest.MonkeyPatch.context() as patch:
        install(site, patch.setattr, after)
        return run_main(["--workdir", str(workdir), "--data_dir", archive, *TINY, *extra])


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def steps_of(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(folder) if s.isdigit()) if os.path.isdir(folder) else []


DISK = [  # (site, writes that succeed first, flags, what the line names, last complete checkpoint)
    ("disk:lock", 0, [], "the lock file", None),
    ("disk:run.json", 0, [], "run.json", None),
    ("disk:holdout.json", 0, ["--val_split", "20"], "holdout.json", None),
    ("disk:metrics.jsonl", 1, [], "metrics.jsonl", r"epoch 1 \(step 6\)"),
    ("disk:curves.png", 0, [], "curves.png", r"epoch \d \(step \d+\)"),  # drawn in the background
    ("disk:checkpoint", 1, [], "the checkpoint of step 12", r"epoch 1 \(step 6\)"),
    ("disk:checkpoint_async", 1, [], "a checkpoint (in the background)", r"epoch 2 \(step 12\)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("site, after, flags, what, last", DISK, ids=[d[0] for d in DISK])
def test_a_full_disk_at_each_write_is_one_line_and_loses_nothing(
    site, after, flags, what, last, archive, tmp_path
):
    workdir = tmp_path / "w"
    proc = inject(site, workdir, archive, "--epochs", "3", *flags, after=after)
    err = lines(proc.stderr)
    assert proc.returncode == 3 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"no space left on device while writing {what}" in err[0], err[0]
    assert "free space and rerun the same command" in err[0]
    if last is None:
        assert "no checkpoint was written yet" in err[0] and not steps_of(workdir)
    else:
        assert re.search(f"the last complete checkpoint is {last}", err[0]), err[0]
        rj.restore(str(workdir), "latest")  # every complete checkpoint reads on the full disk


@pytest.mark.slow
@pytest.mark.parametrize("site", ["disk:checkpoint", "disk:metrics.jsonl"])
def test_after_a_full_disk_the_same_command_resumes_bit_for_bit(site, full_run, archive, tmp_path):
    _, reference = full_run
    workdir = tmp_path / "w"
    assert inject(site, workdir, archive, "--epochs", "3", after=1).returncode == 3
    out = train("--workdir", str(workdir), "--data_dir", archive, "--epochs", "3", *TINY).stdout
    assert "Resuming" in out and "Test accuracy" in out
    assert_same_run(str(workdir), reference)


@pytest.mark.slow
def test_tensorboard_and_the_compilation_cache_on_a_full_disk_warn_once_and_the_run_goes_on(
    archive, tmp_path
):
    proc = inject("disk:tensorboard", tmp_path / "w", archive, "--epochs", "2")
    assert proc.returncode == 0 and "Test accuracy" in proc.stdout, proc.stderr
    warnings = lines(proc.stderr)
    assert len(warnings) == 1 and "TensorBoard events cannot be written" in warnings[0], proc.stderr
    assert len(metrics(tmp_path / "w")) == 2

    blocked = tmp_path / "cache"  # where the cache folder should be, a file: nothing can be written
    os.makedirs(blocked / "resnet_jax")
    (blocked / "resnet_jax" / "xla").write_text("in the way")
    # The first run's evaluation in a process whose cache folder cannot be made (a process that
    # compiles and runs: the evaluation costs less to compile than the train steps).
    proc = train("--workdir", str(tmp_path / "w"), "--eval_only", env=dict(ENV, XDG_CACHE_HOME=str(blocked)))
    assert "Test accuracy" in proc.stdout, proc.stdout
    warnings = lines(proc.stderr)
    assert len(warnings) == 1 and "compilation cache" in warnings[0] and "goes on" in warnings[0], proc.stderr


@pytest.mark.parametrize(
    "site, expected",
    [
        (
            "oom:run",
            r"out of memory on cpu .* at batch 16, float32, model ResNet v1, 4 filters, blocks 1,1,1; "
            r"try a smaller --batch_size \(e.g. 8\) or --dtype bfloat16",
        ),
        ("oom:compile", "out of memory on cpu .* at batch 16, float32"),
        ("oom:data", r"needs .*, more than this machine's available memory \(1.0 MiB free\)"),
    ],
)
def test_out_of_memory_is_one_line_naming_what_to_try(site, expected, archive, tmp_path):
    proc = inject(site, tmp_path / "w", archive, "--epochs", "2")
    err = lines(proc.stderr)
    assert proc.returncode == 3 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(expected, err[0]), err[0]


def test_the_notebook_gets_the_same_line_as_an_exception(monkeypatch, tmp_path):
    import errno

    from conftest import random_dataset

    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("run.json"):
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(rj.MachineFault, match="no space left on device while writing run.json") as e:
        rj.train_and_evaluate(
            rj.presets.tiny(batch_size=8, epochs=1), str(tmp_path / "w"), random_dataset(), verbosity=0
        )
    assert isinstance(e.value, rj.UserError) and e.value.exit_status == 3 and "\n" not in str(e.value)


def _tmpfs(size_mb):
    """A small tmpfs mounted for this test, or None where mounting is not allowed."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return None
    where = tempfile.mkdtemp(prefix="resnet_jax-full-")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", where], capture_output=True
    )
    return where if proc.returncode == 0 else None


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run(archive, tmp_path):
    """A real full disk (a tmpfs, filled by another file once epoch 1 is saved): the run ends in
    one line, every complete checkpoint reads on the full disk, and once space is freed the same
    command resumes and ends bit-identical to a run that never stopped."""
    disk = _tmpfs(24)
    if disk is None:
        pytest.skip("needs root and a tmpfs mount to fill a real disk")
    try:
        reference = str(tmp_path / "reference")
        train("--workdir", reference, "--data_dir", archive, "--epochs", "6", *TINY)
        workdir = os.path.join(disk, "w")
        proc = start(workdir, archive, "--epochs", "6")
        assert wait_for(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and metrics(workdir))
        filler = os.path.join(disk, "filler")
        try:  # every byte left, so the next write of the run fails
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
        except OSError:
            pass
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 3 and len(lines(err)) == 1 and "Traceback" not in err, err
        assert "no space left on device while writing" in err and "free space and rerun" in err
        assert steps_of(workdir) and rj.restore(workdir, "latest")  # readable on the full disk
        os.remove(filler)
        out = train("--workdir", workdir, "--data_dir", archive, "--epochs", "6", *TINY).stdout
        assert "Resuming" in out and "Test accuracy" in out
        assert_same_run(workdir, reference)
    finally:
        subprocess.run(["umount", "-l", disk], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)
