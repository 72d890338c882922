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
