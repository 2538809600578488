"""The huge-page restart: when it applies, that it keeps the command, and that memory lands on huge pages."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from resnet_jax import hugepages

LINUX_GLIBC = ("Linux", ("glibc", "2.36"), "madvise")


@pytest.mark.parametrize(
    "tunables,system,libc,mode,expected",
    [
        (None, *LINUX_GLIBC, "glibc.malloc.hugetlb=1"),
        ("glibc.malloc.arena_max=2", *LINUX_GLIBC, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        ("glibc.malloc.hugetlb=0", *LINUX_GLIBC, None),  # the user's choice (opt-out) wins
        ("glibc.malloc.hugetlb=1", *LINUX_GLIBC, None),  # restarted already: no loop
        (None, "Linux", ("glibc", "2.34"), "madvise", None),  # tunable introduced in glibc 2.35
        (None, "Linux", ("glibc", "2.40.1"), "madvise", "glibc.malloc.hugetlb=1"),
        (None, "Linux", ("", ""), "madvise", None),  # musl or unknown libc
        (None, "Darwin", ("", ""), None, None),
        (None, "Linux", ("glibc", "2.36"), "always", None),  # huge pages already
        (None, "Linux", ("glibc", "2.36"), "never", None),  # none to be had
        (None, "Linux", ("glibc", "2.36"), None, None),
    ],
)
def test_when_a_restart_helps(tunables, system, libc, mode, expected):
    assert hugepages.tunables_with_huge_pages(tunables, system, libc, mode) == expected


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(f)) == "always"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


CHILD = textwrap.dedent("""
    import ctypes, os, sys
    from resnet_jax.hugepages import reexec_with_huge_pages
    print("start", flush=True)  # printed once per process: twice if it restarted
    reexec_with_huge_pages()
    libc = ctypes.CDLL(None)  # glibc's own malloc (numpy would madvise huge pages by itself)
    libc.malloc.restype = ctypes.c_void_p
    a = libc.malloc(64 << 20)
    ctypes.memset(a, 1, 64 << 20)  # touched: 64 MiB resident
    huge = 0
    if os.path.exists("/proc/self/smaps_rollup"):
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                huge = int(line.split()[1])
    from resnet_jax.hugepages import environ_before_restart
    before = environ_before_restart().get("GLIBC_TUNABLES")
    tunables = os.environ.get("GLIBC_TUNABLES")
    print("argv", sys.argv[1:], "tunables", tunables, "huge_kb", huge, "before", before)
""")


def test_restart_keeps_the_command_and_puts_memory_on_huge_pages(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, str(script), "--workdir", "a b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.splitlines()
    expected = hugepages.tunables_with_huge_pages(
        None, platform.system(), platform.libc_ver(), hugepages.thp_mode()
    )
    last = out[-1]
    assert "argv ['--workdir', 'a b']" in last
    if expected is None:  # nothing to gain on this system: no restart, nothing changed
        assert out.count("start") == 1 and "tunables None" in last and "before None" in last
    else:
        assert out.count("start") == 2 and f"tunables {expected}" in last
        assert "before None" in last  # what the user had: no tunables at all
        assert int(last.split("huge_kb ")[1].split()[0]) >= 32 << 10  # most of the 64 MiB


def test_environment_before_restart_is_the_users():
    assert hugepages.environ_before_restart({"A": "1"}) == {"A": "1"}  # no restart happened
    restarted = {"A": "1", "GLIBC_TUNABLES": "x=1:glibc.malloc.hugetlb=1", hugepages.ORIGINAL: "x=1"}
    assert hugepages.environ_before_restart(restarted) == {"A": "1", "GLIBC_TUNABLES": "x=1"}
    restarted = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", hugepages.ORIGINAL: ""}
    assert hugepages.environ_before_restart(restarted) == {}
