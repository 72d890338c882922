"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers on every step.

On CPU, XLA allocates each executable's temporaries (activations, the layer scan's stacked
residuals, …) with ``malloc`` on every call and frees them at the end. glibc serves
blocks above its mmap threshold with fresh ``mmap``s and returns freed memory at the top of
the heap to the kernel once it exceeds ``trim_threshold``, so every call touches gigabytes
of new pages, and the kernel time of those page faults is a large share of a train step
(``benchmarks/model.py`` reports them as ``fedsp_step_page_faults`` / ``fedsp_step_sys_s``;
the measurements with and without these settings are in ``BENCHMARKS.md`` and README).

:data:`TUNABLES` keeps every allocation in the main heap (one arena, no mmap) and never
trims it, so freed memory is reused in place. The cost: the process keeps its peak resident
size until it exits instead of handing freed memory back.

glibc reads ``GLIBC_TUNABLES`` only when a process starts (``mallopt`` cannot set a trim
threshold above 2 GiB), so entry points call :func:`reexec_with_tunables` first thing: it
re-executes the same command line with the variable set and does nothing when it is already
set, off Linux/glibc, or with ``FEDSP_HOST_ALLOCATOR=system``. Library code and notebooks
never re-exec; to use the settings there, start Python with
``GLIBC_TUNABLES=$(python -m fedsp.hostalloc)`` in the environment.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, MutableMapping

TUNABLES: dict[str, str] = {
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(64 << 30),
}
# Set to "system" to leave malloc as it is (no re-exec).
ENV_SWITCH = "FEDSP_HOST_ALLOCATOR"
_VALID_SWITCH = ("fedsp", "system")


def merged_tunables(existing: str | None) -> str:
    """``existing`` (a ``GLIBC_TUNABLES`` value) with :data:`TUNABLES` added.

    Settings the user already gave win over ours; unrelated tunables are kept in order.
    """
    items: dict[str, str] = {}
    for part in (existing or "").split(":"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"GLIBC_TUNABLES entry {part!r} has no '=': expected name=value")
        items[name] = value
    for name, value in TUNABLES.items():
        items.setdefault(name, value)
    return ":".join(f"{k}={v}" for k, v in items.items())


def wanted(env: Mapping[str, str]) -> bool:
    """Whether an entry point with this environment should re-execute itself."""
    switch = env.get(ENV_SWITCH, "fedsp")
    if switch not in _VALID_SWITCH:
        raise ValueError(f"{ENV_SWITCH}={switch!r}: expected one of {_VALID_SWITCH}")
    if switch == "system" or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    present = {p.partition("=")[0] for p in env.get("GLIBC_TUNABLES", "").split(":") if p}
    return not set(TUNABLES) <= present


def reexec_with_tunables(env: MutableMapping[str, str] | None = None) -> None:
    """Re-executes this Python command line with :data:`TUNABLES` in ``GLIBC_TUNABLES``.

    Call it at the top of a ``__main__`` block, before any work: it does not return when it
    re-executes. No-op when :func:`wanted` says so.
    """
    env = os.environ if env is None else env
    if not wanted(env):
        return
    new_env = dict(env)
    new_env["GLIBC_TUNABLES"] = merged_tunables(env.get("GLIBC_TUNABLES"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], new_env)


if __name__ == "__main__":
    print(merged_tunables(os.environ.get("GLIBC_TUNABLES")))
