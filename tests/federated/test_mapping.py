"""Tests for fedsp.federated.mapping on 4 simulated CPU devices (see tests/conftest.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fedsp import compilation_cache
from fedsp.federated.mapping import BACKENDS, CLIENTS_AXIS, client_mesh, map_clients

DIM, HIDDEN, EXAMPLES, STEPS, LR = 6, 4, 5, 3, 0.3


def local_sgd(base, head, data):
    """A few SGD steps of a linear head on frozen tanh features (one client).

    base: [DIM, HIDDEN] frozen; head: {"w": [HIDDEN], "b": []}; data: {"x": [N, DIM], "y": [N]}.
    Returns (trained head, {"loss": first-step loss, "base_sum": Σ base}).
    """
    features = jnp.tanh(data["x"] @ base)

    def loss_fn(h):
        return jnp.mean(jnp.square(features @ h["w"] + h["b"] - data["y"]))

    first_loss = loss_fn(head)
    for _ in range(STEPS):
        grads = jax.grad(loss_fn)(head)
        head = jax.tree.map(lambda p, g: p - LR * g, head, grads)
    return head, {"loss": first_loss, "base_sum": jnp.sum(base)}


def numpy_local_sgd(base, w, b, x, y):
    """Independent numpy version of `local_sgd` with the gradient written out."""
    feats = np.tanh(x @ base)
    first = np.mean((feats @ w + b - y) ** 2)
    for _ in range(STEPS):
        resid = feats @ w + b - y
        w = w - LR * 2 * feats.T @ resid / len(y)
        b = b - LR * 2 * resid.mean()
    return w, b, first


def _problem(num_clients: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(DIM, HIDDEN)).astype(np.float32)
    heads = {
        "w": rng.normal(size=(num_clients, HIDDEN)).astype(np.float32),
        "b": rng.normal(size=(num_clients,)).astype(np.float32),
    }
    data = {
        "x": rng.normal(size=(num_clients, EXAMPLES, DIM)).astype(np.float32),
        "y": rng.normal(size=(num_clients, EXAMPLES)).astype(np.float32),
    }
    return base, heads, data


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "num_clients, backends", [(8, ("vmap", "loop", "pmap")), (4, BACKENDS), (2, BACKENDS)]
)
def test_backends_agree_with_numpy(num_clients, backends):
    base, heads, data = _problem(num_clients)
    outputs = {
        name: map_clients(local_sgd, name, in_axes=(None, 0, 0))(base, heads, data)
        for name in backends
    }
    for k in range(num_clients):
        w, b, first = numpy_local_sgd(
            base, heads["w"][k], heads["b"][k], data["x"][k], data["y"][k]
        )
        for name, (head, stats) in outputs.items():
            np.testing.assert_allclose(head["w"][k], w, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(head["b"][k], b, rtol=1e-5, atol=1e-6, err_msg=name)
            np.testing.assert_allclose(stats["loss"][k], first, rtol=1e-5, err_msg=name)
    for name in backends:
        _assert_trees_close(outputs[name], outputs["loop"])


def test_vmap_output_is_sharded_over_clients():
    num_clients = 8
    base, heads, data = _problem(num_clients)
    head, stats = map_clients(local_sgd, "vmap", in_axes=(None, 0, 0))(base, heads, data)
    for leaf in jax.tree.leaves((head, stats)):
        assert isinstance(leaf.sharding, NamedSharding)
        assert leaf.sharding.mesh.axis_names == (CLIENTS_AXIS,)
        assert leaf.sharding.spec[0] == CLIENTS_AXIS
        shards = leaf.addressable_shards
        assert len(shards) == jax.device_count() == 4
        assert {s.device for s in shards} == set(jax.devices())
        starts = sorted(s.index[0].start for s in shards)
        assert starts == [0, 2, 4, 6]  # each device holds C/D = 2 distinct clients
        for s in shards:
            assert s.data.shape[0] == num_clients // 4
            np.testing.assert_array_equal(np.asarray(s.data), np.asarray(leaf)[s.index])


def test_frozen_argument_is_broadcast_not_sliced():
    # The frozen matrix has a leading size equal to C: it must still reach every client
    # whole, never split into per-client rows.
    num_clients = 4
    frozen = jnp.arange(num_clients * 3, dtype=jnp.float32).reshape(num_clients, 3)
    stacked = jnp.arange(num_clients, dtype=jnp.float32)

    def fn(matrix, scalar):
        return {"total": jnp.sum(matrix) + 0.0 * scalar, "row_count": jnp.float32(matrix.shape[0])}

    for backend in BACKENDS:
        out = map_clients(fn, backend, in_axes=(None, 0))(frozen, stacked)
        np.testing.assert_array_equal(out["total"], np.full(num_clients, 66.0), err_msg=backend)
        np.testing.assert_array_equal(out["row_count"], np.full(num_clients, 4.0), err_msg=backend)


def test_vmap_frozen_weights_are_not_copied_per_client():
    # A 4 MiB frozen matrix and C/D = 2 clients per device: a per-client broadcast would
    # need ≥ 8 MiB of temporaries; the closure form keeps the matmul unbatched.
    num_clients, dim = 8, 1024
    base = jnp.ones((dim, dim), jnp.float32)
    xs = jnp.ones((num_clients, 4, dim), jnp.float32)
    mapped = map_clients(lambda w, x: jnp.tanh(x @ w) @ w, "vmap", in_axes=(None, 0))
    compiled = jax.jit(mapped).lower(base, xs).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < base.nbytes // 4


def test_vmap_inside_jit_and_grad_matches_loop():
    num_clients = 4
    base, heads, data = _problem(num_clients, seed=1)

    def total_loss(backend, heads):
        head, stats = map_clients(local_sgd, backend, in_axes=(None, 0, 0))(base, heads, data)
        return jnp.sum(stats["loss"]) + jnp.sum(head["w"] ** 2)

    loop_loss = functools.partial(total_loss, "loop")
    want_value, want_grads = jax.jit(jax.value_and_grad(loop_loss))(heads)
    for backend in ("vmap", "pmap"):
        value, grads = jax.jit(jax.value_and_grad(functools.partial(total_loss, backend)))(heads)
        np.testing.assert_allclose(value, want_value, rtol=1e-5)
        _assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-5)


def test_uneven_client_count_vmap_still_matches_loop():
    base, heads, data = _problem(6, seed=2)
    vmapped = map_clients(local_sgd, "vmap", in_axes=(None, 0, 0))(base, heads, data)
    looped = map_clients(local_sgd, "loop", in_axes=(None, 0, 0))(base, heads, data)
    _assert_trees_close(vmapped, looped)


def _sgd_step(base, head, data, constrain):
    """One SGD step of `local_sgd`; ``constrain`` pins the hidden features to the "model"
    axis with a bare PartitionSpec, which needs the mesh context map_clients sets."""
    features = jnp.tanh(data["x"] @ base)
    if constrain:
        features = jax.lax.with_sharding_constraint(features, P(None, "model"))
    w = head["w"] - LR * 2 * features.T @ (features @ head["w"] + head["b"] - data["y"]) / EXAMPLES
    return {"w": w, "b": head["b"]}


def test_two_dimensional_clients_model_mesh():
    mesh = jax.make_mesh(
        (2, 2), (CLIENTS_AXIS, "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    num_clients = 4
    base, heads, data = _problem(num_clients, seed=3)
    base = jax.device_put(base, NamedSharding(mesh, P(None, "model")))  # FSDP-style base
    sharded = functools.partial(_sgd_step, constrain=True)
    out = map_clients(sharded, "vmap", mesh=mesh, in_axes=(None, 0, 0))(base, heads, data)
    plain = functools.partial(_sgd_step, constrain=False)
    want = map_clients(plain, "loop", in_axes=(None, 0, 0))(np.asarray(base), heads, data)
    _assert_trees_close(out, want)
    for leaf in jax.tree.leaves(out):
        assert leaf.sharding.spec[0] == CLIENTS_AXIS
        assert leaf.sharding.mesh.shape == {CLIENTS_AXIS: 2, "model": 2}
        # 2 client groups × 2 model shards: every device holds C/2 = 2 clients.
        assert all(s.data.shape[0] == 2 for s in leaf.addressable_shards)
        assert sorted({s.index[0].start for s in leaf.addressable_shards}) == [0, 2]


@pytest.mark.parametrize("at_once", [1, 2])
def test_clients_in_groups_match_vmap_and_stay_sharded(at_once):
    # 8 clients on 4 devices: each device runs its 2 clients one by one (1) or together (2).
    num_clients = 8
    base, heads, data = _problem(num_clients, seed=5)
    want = map_clients(local_sgd, "vmap", in_axes=(None, 0, 0))(base, heads, data)
    mapped = map_clients(local_sgd, "vmap", in_axes=(None, 0, 0), clients_at_once=at_once)
    got = mapped(base, heads, data)
    _assert_trees_close(got, want)
    for leaf in jax.tree.leaves(got):
        assert leaf.sharding.spec[0] == CLIENTS_AXIS
        assert sorted(s.index[0].start for s in leaf.addressable_shards) == [0, 2, 4, 6]

    # Under an outer jit and grad too (the frozen base gets the summed gradient).
    def total(b):
        head, stats = mapped(b, heads, data)
        return jnp.sum(head["w"]) + jnp.sum(stats["loss"])

    def total_loop(b):
        head, stats = map_clients(local_sgd, "loop", in_axes=(None, 0, 0))(b, heads, data)
        return jnp.sum(head["w"]) + jnp.sum(stats["loss"])

    _assert_trees_close(jax.jit(jax.grad(total))(base), jax.grad(total_loop)(base), rtol=1e-4)


def test_clients_in_groups_on_a_clients_model_mesh():
    mesh = jax.make_mesh(
        (2, 2), (CLIENTS_AXIS, "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    base, heads, data = _problem(4, seed=3)
    base = jax.device_put(base, NamedSharding(mesh, P(None, "model")))
    plain = functools.partial(_sgd_step, constrain=False)
    got = map_clients(plain, "vmap", mesh=mesh, in_axes=(None, 0, 0), clients_at_once=1)(
        base, heads, data
    )
    want = map_clients(plain, "loop", in_axes=(None, 0, 0))(np.asarray(base), heads, data)
    _assert_trees_close(got, want)


def test_pmap_groups_more_clients_than_devices_in_order():
    num_clients = 12
    offsets = jnp.arange(num_clients, dtype=jnp.float32)
    mapped = map_clients(lambda scale, x: scale * x + 1.0, "pmap", in_axes=(None, 0))
    out = mapped(jnp.float32(2.0), offsets)
    np.testing.assert_array_equal(out, 2.0 * np.arange(num_clients) + 1.0)


def test_single_in_axes_value_and_client_mesh():
    out = map_clients(lambda a, b: a * b, "vmap")(jnp.arange(4.0), jnp.arange(4.0) + 1)
    np.testing.assert_array_equal(out, np.arange(4.0) * (np.arange(4.0) + 1))
    assert client_mesh().shape == {CLIENTS_AXIS: 4}
    assert client_mesh(2).shape == {CLIENTS_AXIS: 2}


# ---------------------------------------------------------------- validation


def test_unknown_backend_lists_choices():
    choices = r"\('vmap', 'pmap', 'loop'\)"
    with pytest.raises(ValueError, match=rf"backend must be one of {choices}, got 'shard'"):
        map_clients(local_sgd, "shard")


def test_pmap_rejects_client_count_not_multiple_of_devices():
    mapped = map_clients(lambda x: x * 2, "pmap")
    with pytest.raises(ValueError, match=r"C = 6 .* local device count 4"):
        mapped(jnp.zeros((6, 3)))


def test_mismatched_client_counts_name_the_arguments():
    base, heads, data = _problem(4)
    data = {**data, "y": data["y"][:3]}
    for backend in BACKENDS:
        mapped = map_clients(local_sgd, backend, in_axes=(None, 0, 0))
        with pytest.raises(ValueError, match=r"argument 1\['b'\]: 4.*argument 2\['y'\]: 3"):
            mapped(base, heads, data)


def test_bad_in_axes_and_mesh():
    with pytest.raises(ValueError, match=r"in_axes entries must be 0 .* or None"):
        map_clients(local_sgd, "loop", in_axes=(None, 1, 0))
    with pytest.raises(ValueError, match=r"in_axes has 2 entries"):
        map_clients(local_sgd, "loop", in_axes=(None, 0))(*_problem(4))
    with pytest.raises(ValueError, match=r"at least one argument with 0"):
        map_clients(local_sgd, "vmap", in_axes=None)(*_problem(4))
    with pytest.raises(ValueError, match=r"argument 0 is stacked .* got a scalar"):
        map_clients(lambda x: x, "loop")(jnp.float32(1.0))
    with pytest.raises(
        ValueError, match=r"clients_at_once must be 0, or.* got 2 with backend 'pmap'"
    ):
        map_clients(local_sgd, "pmap", clients_at_once=2)
    with pytest.raises(ValueError, match=r"clients_at_once must be 0, or.* got -1"):
        map_clients(local_sgd, "vmap", clients_at_once=-1)
    model_only = jax.make_mesh((4,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(ValueError, match=r"mesh must have a 'clients' axis.*\('model',\)"):
        map_clients(local_sgd, "vmap", mesh=model_only)


def test_a_static_key_keeps_the_program_for_later_processes(private_compilation_cache):
    store = private_compilation_cache / "executables"
    base, heads, data = _problem(4)
    kept = map_clients(local_sgd, "vmap", in_axes=(None, 0, 0), static_key="sgd")(base, heads, data)
    plain = map_clients(local_sgd, "vmap", in_axes=(None, 0, 0))(base, heads, data)
    _assert_trees_close(kept, plain, rtol=0, atol=0)
    assert len(list(store.glob("*.xla"))) == 1
    # A new map_clients (a new run or process) loads it, placed over the clients axis.
    clock = compilation_cache.compile_clock()
    again = map_clients(local_sgd, "vmap", in_axes=(None, 0, 0), static_key="sgd")
    head, stats = again(base, heads, data)
    assert compilation_cache.compile_clock().since(clock).cache_hits == 1
    _assert_trees_close((head, stats), plain, rtol=0, atol=0)
    assert head["w"].sharding.spec == P(CLIENTS_AXIS)
