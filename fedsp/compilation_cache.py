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
"""

from __future__ import annotations

import os
import pathlib

import jax

__all__ = ["ENV", "MAX_BYTES", "MIN_COMPILE_TIME_S", "enable"]

ENV = "FEDSP_COMPILATION_CACHE"
# Programs that compile faster than this are not worth a file (most of a round's eager
# helper ops compile in 10-100 ms).
MIN_COMPILE_TIME_S = 0.2
MAX_BYTES = 4 << 30


def enable() -> pathlib.Path | None:
    """Turns the cache on (see the module docstring); returns its directory, or None
    when it is off. Calling it again changes nothing."""
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
