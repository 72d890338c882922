"""Test-wide setup: several simulated CPU devices, so multi-device code paths run on CPU.

XLA reads the flag when the backend starts, so it must be set before jax is imported;
pytest imports this file first.
"""

import os

_N_DEVICES = int(os.environ.get("FEDSP_TEST_DEVICES", "4"))
_flag = f"--xla_force_host_platform_device_count={_N_DEVICES}"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

from fedsp import compilation_cache  # noqa: E402

# Test processes (and the workers they start) share compiled programs through the
# persistent cache, as runs do; FEDSP_COMPILATION_CACHE=off turns it off.
compilation_cache.enable()

import pathlib  # noqa: E402

# Benchmark files are read from ../shared/data beside the checkout (never copied into the
# repo); the Makefile exports FEDSP_DATA_DIR, this default covers a bare `pytest` run.
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("FEDSP_DATA_DIR", str(_SHARED_DATA))


import pytest  # noqa: E402


@pytest.fixture
def private_compilation_cache(tmp_path, monkeypatch):
    """JAX's persistent cache and fedsp's executable store in ``tmp_path`` (empty, every
    program cached), the shared test cache restored afterwards."""
    from jax._src import compilation_cache as jax_cache  # test-only: reset JAX's cache

    from fedsp import executables

    before = (
        jax.config.jax_compilation_cache_dir,  # type: ignore[attr-defined]
        jax.config.jax_persistent_cache_min_compile_time_secs,  # type: ignore[attr-defined]
    )
    jax_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    monkeypatch.setattr(executables, "_PREFETCHED", {})
    monkeypatch.setattr(executables, "_MANIFEST", {"path": None, "keys": []})
    yield tmp_path / "jax"
    jax_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
