"""Tests for fedsp.executables: programs kept across processes, loaded without tracing."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsp import compilation_cache, executables

TRACES: list[str] = []


def affine(x, bias, scale, *, shift=0.0):
    TRACES.append("affine")  # runs only while JAX traces the function
    return {"y": x * scale + bias + shift, "sum": jnp.sum(x)}


@pytest.fixture
def store(private_compilation_cache):
    """An empty store beside an empty JAX cache, a fresh trace count."""
    TRACES.clear()
    return private_compilation_cache / "executables"


def program() -> executables.Program:
    # A new Program has an empty memory: it stands for a new process.
    return executables.Program(affine, "tests.affine", "v1", static_argnames=("scale", "shift"))


def entries(store) -> list:
    return sorted(store.glob("*.xla"))


def test_a_new_process_loads_the_program_without_tracing(store):
    x, bias = jnp.arange(4.0), jnp.float32(0.5)
    first = program()(x, bias, 3.0, shift=1.0)
    assert TRACES == ["affine"] and len(entries(store)) == 1
    np.testing.assert_array_equal(first["y"], np.arange(4.0) * 3 + 1.5)
    x1 = x + 1
    clock = compilation_cache.compile_clock()
    again = program()
    second = again(x1, bias, 3.0, shift=1.0)  # new values, same shapes and statics
    assert TRACES == ["affine"]  # loaded, not traced
    assert compilation_cache.compile_clock().since(clock).cache_hits == 1
    np.testing.assert_array_equal(second["y"], (np.arange(4.0) + 1) * 3 + 1.5)
    assert float(second["sum"]) == 10.0
    again(x, bias, 3.0, shift=1.0)
    assert again.cache_size() == 1


def test_the_key_follows_shapes_dtypes_statics_and_the_static_key(store):
    p = program()
    x, bias = jnp.arange(4.0), jnp.float32(0.5)
    p(x, bias, 3.0)
    p(x * 2, bias + 1, 3.0)  # same program
    assert len(entries(store)) == 1 and len(TRACES) == 1
    p(jnp.arange(5.0), bias, 3.0)  # shape
    p(jnp.arange(4), bias, 3.0)  # dtype
    p(x, bias, 2.0)  # positional static argument
    p(x, bias, 3.0, shift=2.0)  # keyword static argument
    np.testing.assert_array_equal(p(x, bias, 2.0)["y"], np.arange(4.0) * 2 + 0.5)
    assert len(entries(store)) == 5 and p.cache_size() == 5 and len(TRACES) == 5
    other = executables.Program(affine, "tests.affine", "v2", static_argnames=("scale", "shift"))
    other(x, bias, 3.0)
    assert len(entries(store)) == 6  # (JAX reuses its own in-process trace)


def test_a_corrupt_entry_is_dropped_and_compiled_again(store, caplog):
    x, bias = jnp.arange(3.0), jnp.float32(1.0)
    program()(x, bias, 2.0)
    (entry,) = entries(store)
    entry.write_bytes(b"not an executable")
    with caplog.at_level(logging.WARNING, logger="fedsp.executables"):
        out = program()(x, bias, 2.0)
    assert "dropping unreadable compiled program" in caplog.text and str(entry) in caplog.text
    np.testing.assert_array_equal(out["y"], np.arange(3.0) * 2 + 1)
    # Served from JAX's cache this time (the compile stored it under the entry's name).
    assert entries(store) == []


def test_jax_cache_holds_a_program_only_under_its_store_key(store):
    x = jnp.arange(7.0)
    jax.jit(affine, static_argnames=("scale", "shift"))(x, 0.0, 5.0)  # JAX caches this
    jax.clear_caches()  # (the memory of a new process)
    program()(x, jnp.float32(0.0), 5.0)  # JAX's cache has another name: compiled, stored
    (entry,) = entries(store)
    # The store loses the entry: JAX's cache serves the program, which is not stored
    # again (an executable JAX loaded cannot be serialised again on CPU).
    entry.unlink()
    jax.clear_caches()
    out = program()(x, jnp.float32(0.0), 5.0)
    np.testing.assert_array_equal(out["y"], np.arange(7.0) * 5)
    assert entries(store) == []


def test_under_a_transformation_the_jitted_function_runs(store):
    p = program()
    out = jax.jit(lambda x: p(x, jnp.float32(0.0), 2.0)["y"])(jnp.ones(2))
    np.testing.assert_array_equal(out, [2.0, 2.0])
    assert p.cache_size() == 0 and entries(store) == []


def test_a_static_value_without_a_stable_form_is_not_stored(store):
    class Opaque:  # unpicklable (local class) and its repr holds an address
        def __hash__(self):
            return 0

        def __eq__(self, other):
            return isinstance(other, Opaque)

    p = executables.Program(affine, "tests.affine", Opaque(), static_argnames=("scale", "shift"))
    np.testing.assert_array_equal(p(jnp.ones(2), jnp.float32(0.0), 2.0)["y"], [2.0, 2.0])
    assert entries(store) == [] and p.cache_size() == 0


def test_prefetch_loads_what_the_last_process_with_the_tag_used(store):
    assert executables.prefetch("run-a") == 0  # nothing known yet; starts the manifest
    x, bias = jnp.arange(4.0), jnp.float32(0.5)
    program()(x, bias, 3.0)
    program()(jnp.arange(6.0), bias, 3.0)
    assert len(entries(store)) == 2
    traced = len(TRACES)
    # A later process: both load in the background, the calls wait for them.
    executables._PREFETCHED.clear()
    executables._MANIFEST.update(path=None, keys=[])
    clock = compilation_cache.compile_clock()
    assert executables.prefetch("run-a") == 2
    assert executables.prefetch("run-b") == 0  # another tag: nothing listed
    x6 = jnp.arange(6.0)
    p = program()
    np.testing.assert_array_equal(p(x, bias, 3.0)["y"], np.arange(4.0) * 3 + 0.5)
    np.testing.assert_array_equal(p(x6, bias, 3.0)["sum"], 15.0)
    spent = compilation_cache.compile_clock().since(clock)
    assert len(TRACES) == traced and executables._PREFETCHED == {}
    assert spent.cache_hits == 2 and spent.background_s > 0


def test_code_key_hashes_user_code_only():
    assert executables.code_key(executables.Program) == ("fedsp.executables.Program", "")
    name, digest = executables.code_key(TestOnly())
    assert name.endswith("TestOnly") and len(digest) == 64


class TestOnly:
    __test__ = False


def test_jax_clear_caches_drops_the_executables_in_memory(store):
    p = program()
    p(jnp.arange(2.0), jnp.float32(0.0), 2.0)
    assert p.cache_size() == 1
    jax.clear_caches()
    assert p.cache_size() == 0
    np.testing.assert_array_equal(p(jnp.arange(2.0), jnp.float32(1.0), 2.0)["y"], [1.0, 3.0])
