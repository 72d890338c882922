"""fedsp.hostalloc: the GLIBC_TUNABLES merge, when entry points re-exec, and the re-exec."""

import os
import platform
import subprocess
import sys

import pytest

from fedsp import hostalloc

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def test_merge_adds_ours_and_keeps_the_users():
    merged = hostalloc.merged_tunables("glibc.malloc.arena_max=4:glibc.cpu.hwcaps=-AVX512F")
    items = dict(p.split("=") for p in merged.split(":"))
    assert items["glibc.malloc.arena_max"] == "4"  # the user's value wins
    assert items["glibc.cpu.hwcaps"] == "-AVX512F"
    assert items["glibc.malloc.mmap_max"] == "0"
    assert items["glibc.malloc.trim_threshold"] == str(64 << 30)
    assert hostalloc.merged_tunables(None) == ":".join(
        f"{k}={v}" for k, v in hostalloc.TUNABLES.items()
    )


def test_merge_rejects_an_entry_without_a_value():
    with pytest.raises(ValueError, match="no '='"):
        hostalloc.merged_tunables("glibc.malloc.arena_max")


def test_wanted():
    full = hostalloc.merged_tunables(None)
    assert not hostalloc.wanted({"GLIBC_TUNABLES": full})
    assert not hostalloc.wanted({hostalloc.ENV_SWITCH: "system"})
    with pytest.raises(ValueError, match=hostalloc.ENV_SWITCH):
        hostalloc.wanted({hostalloc.ENV_SWITCH: "jemalloc"})
    if GLIBC:
        assert hostalloc.wanted({})
        assert hostalloc.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})


@pytest.mark.skipif(not GLIBC, reason="re-exec applies to Linux with glibc only")
def test_reexec_runs_the_same_command_with_the_tunables(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        "from fedsp import hostalloc\n"
        "print('start', flush=True)\n"
        "hostalloc.reexec_with_tunables()\n"
        "print('args', sys.argv[1:])\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostalloc.ENV_SWITCH)}
    out = subprocess.run(
        [sys.executable, str(script), "--x=1", "y"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert out == [
        "start",
        "start",
        "args ['--x=1', 'y']",
        f"tunables {hostalloc.merged_tunables(None)}",
    ]
    env[hostalloc.ENV_SWITCH] = "system"
    out = subprocess.run(
        [sys.executable, str(script)], env=env, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out == ["start", "args []", "tunables None"]  # ran once, malloc untouched
