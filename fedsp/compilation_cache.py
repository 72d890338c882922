"""JAX's persistent compilation cache, on by default for runs and tests.

A process that compiles a program another process already compiled (the next run of a
config, the next table cell, a resumed run, a benchmark's second sitting) loads the
executable from disk instead. `enable` is called by `fedsp.init_run` (so by `fedsp.run`,
``experiments.run``, the tables and every benchmark that builds a run) and by the tests'
conftest.

Where: ``$FEDSP_COMPILATION_CACHE``, else the ``jax`` folder of fedsp's cache directory
(`fedsp.assets.cache_dir`: ``$FEDSP_CACHE`` or ``~/.cache/fedsp``).
``FEDSP_COMPILATION_CACHE=off`` turns it off. A cache directory the user gave JAX
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is kept as it is.

The cache holds at most `MAX_BYTES` (least recently used entries go first); with a size
bound JAX locks the directory while it reads or writes an entry, so processes that share
it (test workers, the hosts of one machine) never read a half-written one. As JAX warns,
the cache is trusted: anyone who can write to it can make your processes run their code.
Beside it, `fedsp.executables` keeps the programs a run starts with, loadable without
tracing (its ``executables/`` folder).

`compile_clock` counts, from JAX's monitoring events, the seconds this process spent
tracing, lowering and compiling (or loading from the cache) and the cache's hits and
misses; a run logs them per round (``time/compile_s``) and in its summary.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading

import jax
from jax import monitoring

__all__ = [
    "ENV",
    "MAX_BYTES",
    "MIN_COMPILE_TIME_S",
    "CompileClock",
    "compile_clock",
    "directory",
    "enable",
    "record_load",
    "record_wait",
]

ENV = "FEDSP_COMPILATION_CACHE"
# Programs that compile faster than this are not worth a file (most of a round's eager
# helper ops compile in 10-100 ms). Caching them too (0) saved ~1.8 s of the demo's warm
# start, but a test worker then crashed (SIGSEGV) inside JAX while loading a cached eager
# `concatenate` with another process using the same cache (BENCHMARKS.md, make demo).
MIN_COMPILE_TIME_S = 0.2
MAX_BYTES = 4 << 30


def enable() -> pathlib.Path | None:
    """Turns the cache on (see the module docstring); returns its directory, or None
    when it is off. Calling it again changes nothing."""
    compile_clock()
    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    if current:
        return pathlib.Path(current)
    setting = os.environ.get(ENV, "")
    if setting.lower() == "off":
        return None
    if setting:
        directory = pathlib.Path(setting).expanduser()
    else:
        from fedsp.assets import cache_dir

        directory = cache_dir() / "jax"
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory


def directory() -> pathlib.Path | None:
    """The persistent cache's directory, or None when it is off."""
    current = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    return pathlib.Path(current) if current else None


# JAX's monitoring events (jax/_src/dispatch.py, compiler.py, compilation_cache.py).
_TRACE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"  # compile, or cache load
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_MISS_EVENT = "/jax/compilation_cache/cache_misses"


@dataclasses.dataclass
class CompileClock:
    """Totals since the process started counting (`compile_clock`).

    Attributes:
      trace_s: tracing to a jaxpr and lowering to StableHLO.
      backend_s: XLA compilation, or loading the executable from the persistent cache
        (JAX's, or `fedsp.executables`).
      cache_hits: executables loaded from either.
      cache_misses: executables compiled and looked up in vain (then written to the
        cache when they took at least `MIN_COMPILE_TIME_S`).
      background_s: loading executables on background threads (`fedsp.executables.
        prefetch`), beside the run's own work; not in `total_s`, which counts the time
        the caller waited (a wait for a background load is in ``backend_s``).
    """

    trace_s: float = 0.0
    backend_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    background_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.trace_s + self.backend_s

    def since(self, earlier: CompileClock) -> CompileClock:
        """The counts between ``earlier`` (a `snapshot`) and this one."""
        return CompileClock(
            *(getattr(self, f.name) - getattr(earlier, f.name) for f in dataclasses.fields(self))
        )

    def snapshot(self) -> CompileClock:
        return dataclasses.replace(self)


_CLOCK = CompileClock()
_LOCK = threading.Lock()
_LISTENING = False


def _on_duration(event: str, duration_secs: float, **_: str | int) -> None:
    if event == _BACKEND_EVENT:
        with _LOCK:
            _CLOCK.backend_s += duration_secs
    elif event in _TRACE_EVENTS:
        with _LOCK:
            _CLOCK.trace_s += duration_secs


def _on_event(event: str, **_: str | int) -> None:
    if event == _HIT_EVENT:
        with _LOCK:
            _CLOCK.cache_hits += 1
    elif event == _MISS_EVENT:
        with _LOCK:
            _CLOCK.cache_misses += 1


def record_load(seconds: float, *, background: bool = False) -> None:
    """Counts an executable loaded outside JAX's cache (`fedsp.executables`) as a hit;
    a ``background`` load's time goes to ``background_s``."""
    with _LOCK:
        if background:
            _CLOCK.background_s += seconds
        else:
            _CLOCK.backend_s += seconds
        _CLOCK.cache_hits += 1


def record_wait(seconds: float) -> None:
    """Counts time spent waiting for a background load as ``backend_s``."""
    with _LOCK:
        _CLOCK.backend_s += seconds


def compile_clock() -> CompileClock:
    """A snapshot of this process's compile totals; the first call starts the count.

    ``after.since(before)`` gives the compile time of what ran between two snapshots.
    """
    global _LISTENING
    with _LOCK:
        if not _LISTENING:
            monitoring.register_event_duration_secs_listener(_on_duration)
            monitoring.register_event_listener(_on_event)
            _LISTENING = True
        return _CLOCK.snapshot()
