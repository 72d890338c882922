"""Tests for fedsp.core.aggregation: golden values, numpy recurrences, invariants.

Golden-value tests are `chex.TestCase` methods under `chex.variants`: each runs once
eagerly and once under `jax.jit` (pytest ids end in ``__without_jit`` / ``__with_jit``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from fedsp.core import aggregation as agg

B1, B2, TAU, LR = 0.9, 0.99, 1e-3, 0.1


def _stacked_params(rng: np.random.Generator, num_clients: int) -> dict:
    return {
        "lora_a": rng.normal(size=(num_clients, 3, 2)).astype(np.float32),
        "block": {"lora_b": rng.normal(size=(num_clients, 4)).astype(np.float32)},
    }


def _server_params(rng: np.random.Generator) -> dict:
    return {
        "lora_a": rng.normal(size=(3, 2)).astype(np.float32),
        "block": {"lora_b": rng.normal(size=(4,)).astype(np.float32)},
    }


# ---------------------------------------------------------------- weighted mean / fedavg


class WeightedMeanTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_weighted_mean_golden_unnormalized_weights_and_pruned_client(self):
        tree = {
            "a": jnp.array([[1.0, 2.0], [100.0, 200.0], [4.0, 8.0]]),
            "b": {"c": jnp.array([3.0, 1000.0, 6.0])},
        }
        weights = jnp.array([2.0, 0.0, 1.0])  # client 1 pruned, weights sum to 3
        out = self.variant(agg.weighted_mean)(tree, weights)
        # (2·[1, 2] + 1·[4, 8]) / 3 = [2, 4];  (2·3 + 6) / 3 = 4
        np.testing.assert_allclose(out["a"], [2.0, 4.0], rtol=1e-6)
        np.testing.assert_allclose(out["b"]["c"], 4.0, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_weighted_mean_pruned_client_with_nan_is_excluded(self):
        tree = {"a": jnp.array([[1.0, 3.0], [jnp.nan, jnp.inf], [5.0, 7.0]])}
        out = self.variant(agg.weighted_mean)(tree, jnp.array([1.0, 0.0, 1.0]))
        np.testing.assert_allclose(out["a"], [3.0, 5.0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_weighted_mean_all_zero_weights_gives_zeros(self):
        tree = {"a": jnp.ones((3, 2)) * 5.0}
        out = self.variant(agg.weighted_mean)(tree, jnp.zeros(3))
        np.testing.assert_array_equal(out["a"], np.zeros(2))

    @chex.variants(with_jit=True, without_jit=True)
    def test_weighted_mean_bf16_keeps_dtype_and_accumulates_in_float32(self):
        rng = np.random.default_rng(2)
        values = rng.normal(size=(64, 8)).astype(np.float32)
        leaf = jnp.asarray(values, jnp.bfloat16)
        weights = rng.uniform(0.0, 1.0, size=64).astype(np.float32)
        out = self.variant(agg.weighted_mean)({"w": leaf}, weights)["w"]
        chex.assert_type(out, jnp.bfloat16)
        exact = np.tensordot(weights, np.asarray(leaf, np.float32), axes=1) / weights.sum()
        # float32 accumulation then one rounding to bf16: at most half a bf16 ulp (2^-8 rel).
        np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2.0**-8, atol=1e-6)


def test_weighted_mean_matches_numpy_and_jit():
    rng = np.random.default_rng(0)
    tree = _stacked_params(rng, 5)
    weights = rng.uniform(0.5, 3.0, size=5).astype(np.float32)
    out = agg.weighted_mean(tree, weights)
    out_jit = jax.jit(agg.weighted_mean)(tree, weights)
    want = jax.tree.map(lambda leaf: np.tensordot(weights, leaf, axes=1) / weights.sum(), tree)
    chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(out_jit, out, rtol=1e-6, atol=1e-7)


def test_weighted_mean_grads():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=4), jnp.float32)
    with jax.enable_x64(True):
        x64, w64 = x.astype(jnp.float64), w.astype(jnp.float64)
        fn = jax.jit(lambda a, b: agg.weighted_mean({"x": a}, b)["x"])
        check_grads(fn, (x64, w64), order=1)


class FedavgTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_fedavg_equals_weighted_mean_and_keeps_server_dtype(self):
        rng = np.random.default_rng(3)
        clients = _stacked_params(rng, 4)
        server = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _server_params(rng))
        clients_bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), clients)
        weights = jnp.array([1.0, 2.0, 0.0, 3.0])
        out = self.variant(agg.fedavg)(server, clients_bf16, weights)
        want = agg.weighted_mean(clients_bf16, weights)
        for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
            chex.assert_type(got, jnp.bfloat16)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))

    @chex.variants(with_jit=True, without_jit=True)
    def test_fedavg_optimizer_with_unit_lr_is_weighted_mean(self):
        rng = np.random.default_rng(4)
        server, clients = _server_params(rng), _stacked_params(rng, 3)
        weights = jnp.array([3.0, 1.0, 0.5])
        opt = agg.server_optimizer("fedavg", 1.0)
        state = opt.init(server)
        # Through the optax API by hand ...
        grads = agg.pseudo_gradient(server, agg.weighted_mean(clients, weights))
        updates, _ = opt.update(grads, state, server)
        by_hand = optax.apply_updates(server, updates)
        # ... and through server_update (the optimizer, a tuple of functions, is static).
        new, _, metrics = self.variant(agg.server_update, static_argnums=4)(
            server, state, clients, weights, opt
        )
        want = agg.weighted_mean(clients, weights)
        chex.assert_trees_all_close(by_hand, want, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(new, want, rtol=1e-6, atol=1e-6)
        assert float(metrics["applied"]) == 1.0
        np.testing.assert_allclose(metrics["total_weight"], 4.5, rtol=1e-6)


# ---------------------------------------------------------------- server optimizers


def _numpy_server_rounds(name, server, rounds, lr, v0):
    """Independent numpy recurrence of Reddi et al. 2021 (no bias correction)."""
    theta = {k: v.astype(np.float64) for k, v in server.items()}
    m = {k: np.zeros_like(v) for k, v in theta.items()}
    v = {k: np.full_like(x, TAU**2 if v0 is None else v0) for k, x in theta.items()}
    history = []
    for clients, weights in rounds:
        for k in theta:
            mean = np.tensordot(weights, clients[k], axes=1) / weights.sum()
            g = theta[k] - mean
            if name == "fedavg":
                step = g
            elif name == "fedavgm":
                m[k] = B1 * m[k] + g
                step = m[k]
            else:
                m[k] = B1 * m[k] + (1 - B1) * g
                if name == "fedadam":
                    v[k] = B2 * v[k] + (1 - B2) * g**2
                else:
                    v[k] = v[k] - (1 - B2) * g**2 * np.sign(v[k] - g**2)
                step = m[k] / (np.sqrt(v[k]) + TAU)
            theta[k] = theta[k] - lr * step
        history.append({k: x.copy() for k, x in theta.items()})
    return history


class ServerOptimizerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        (f"{name}_v0_{v0}", name, v0)
        for name in ("fedavg", "fedavgm", "fedadam", "fedyogi")
        for v0 in (None, 0.0)
    )
    def test_server_optimizers_match_numpy_recurrence(self, name, v0):
        rng = np.random.default_rng(5)
        server = {
            "a": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32),
        }
        rounds = []
        for _ in range(3):
            clients = {
                k: (x + 0.3 * rng.normal(size=(4, *x.shape))).astype(np.float32)
                for k, x in server.items()
            }
            weights = rng.uniform(0.0, 2.0, size=4).astype(np.float32)
            rounds.append((clients, weights))
        want = _numpy_server_rounds(name, server, rounds, LR, v0)

        opt = agg.server_optimizer(name, LR, b1=B1, b2=B2, tau=TAU, v0=v0)
        step = self.variant(lambda p, s, c, w: agg.server_update(p, s, c, w, opt))
        params = jax.tree.map(jnp.asarray, server)
        state = opt.init(params)
        for (clients, weights), expected in zip(rounds, want):
            params, state, _ = step(params, state, clients, weights)
            chex.assert_trees_all_close(params, expected, rtol=2e-5, atol=2e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_v0_conventions_differ_on_first_step(self):
        g = {"x": jnp.array([0.5, -2.0])}
        params = {"x": jnp.zeros(2)}
        first = {}
        for v0 in (None, 0.0):
            opt = agg.server_optimizer("fedadam", 1.0, b1=B1, b2=B2, tau=TAU, v0=v0)
            updates, _ = self.variant(opt.update)(g, opt.init(params), params)
            first[v0] = np.asarray(updates["x"])
        g_np = np.array([0.5, -2.0])
        m = (1 - B1) * g_np
        v_tau2 = B2 * TAU**2 + (1 - B2) * g_np**2
        np.testing.assert_allclose(first[None], -m / (np.sqrt(v_tau2) + TAU), rtol=1e-6)
        np.testing.assert_allclose(first[0.0], -m / (np.sqrt((1 - B2) * g_np**2) + TAU), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_server_optimizer_states_are_named_tuples_that_chain_with_optax(self):
        params = {"x": jnp.array([1.0, -1.0, 2.0])}
        g = {"x": jnp.array([3.0, 4.0, 12.0])}  # ‖g‖ = 13
        fed = agg.server_optimizer("fedyogi", LR)
        chained = optax.chain(optax.clip_by_global_norm(6.5), fed)
        state = chained.init(params)
        assert isinstance(state[1][0], agg.FedAdaptiveState)
        chex.assert_type(state[1][0].nu["x"], jnp.float32)
        got, _ = self.variant(chained.update)(g, state, params)
        clipped, norm = self.variant(agg.clip_update)(g, 6.5)
        want, _ = fed.update(clipped, fed.init(params), params)
        np.testing.assert_allclose(norm, 13.0, rtol=1e-6)
        np.testing.assert_allclose(got["x"], want["x"], rtol=1e-6)
        assert isinstance(
            agg.server_optimizer("fedavgm", 1.0).init(params)[0], agg.ServerMomentumState
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_server_update_skips_round_when_no_client_is_kept(self):
        rng = np.random.default_rng(6)
        server, clients = _server_params(rng), _stacked_params(rng, 3)
        opt = agg.server_optimizer("fedavgm", 1.0)
        server_update = self.variant(agg.server_update, static_argnums=4)
        state = opt.init(server)
        params, state, _ = server_update(server, state, clients, jnp.ones(3), opt)
        same, same_state, metrics = server_update(params, state, clients, jnp.zeros(3), opt)
        chex.assert_trees_all_equal((params, state), (same, same_state))
        assert float(metrics["applied"]) == 0.0
        assert float(metrics["update_norm"]) == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_server_update_bf16_params_keep_dtype_with_float32_state(self):
        rng = np.random.default_rng(7)
        server = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _server_params(rng))
        clients = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _stacked_params(rng, 3))
        opt = agg.server_optimizer("fedadam", 0.01)
        state = opt.init(server)
        new, state, metrics = self.variant(agg.server_update, static_argnums=4)(
            server, state, clients, jnp.ones(3), opt
        )
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(new))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state[0]))
        assert float(metrics["update_norm"]) > 0.0


# ---------------------------------------------------------------- robust aggregation, DP


class ClipUpdateTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_clip_update_golden(self):
        clip_update = self.variant(agg.clip_update)
        delta = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[0.0, 12.0]])}  # ‖Δ‖ = 13
        clipped, norm = clip_update(delta, 6.5)
        np.testing.assert_allclose(norm, 13.0, rtol=1e-6)
        np.testing.assert_allclose(clipped["a"], [1.5, 2.0], rtol=1e-6)
        np.testing.assert_allclose(clipped["b"], [[0.0, 6.0]], rtol=1e-6)
        unchanged, norm = clip_update(delta, 20.0)
        np.testing.assert_allclose(norm, 13.0, rtol=1e-6)
        np.testing.assert_array_equal(unchanged["a"], delta["a"])
        zero, norm = clip_update({"a": jnp.zeros(3)}, 1.0)
        np.testing.assert_array_equal(zero["a"], np.zeros(3))
        assert float(norm) == 0.0


def test_clip_update_bf16_and_grads():
    clipped, _ = agg.clip_update({"a": jnp.array([3.0, 4.0], jnp.bfloat16)}, 1.0)
    assert clipped["a"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(clipped["a"], np.float32), [0.6, 0.8], rtol=2.0**-8)
    with jax.enable_x64(True):
        x = jnp.array([3.0, -4.0, 1.0], jnp.float64)  # norm √26 > 2: clipping branch
        check_grads(jax.jit(lambda v: agg.clip_update({"v": v}, 2.0)[0]["v"]), (x,), order=1)


class TrimmedMeanTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("0", 0), ("1", 1), ("2", 2))
    def test_trimmed_mean_matches_numpy_sort(self, trim):
        rng = np.random.default_rng(8)
        tree = _stacked_params(rng, 5)
        tree["lora_a"][2] = 1e6  # an outlier client, dropped whenever trim ≥ 1
        # trim is a Python int that sets slice bounds: static under jit.
        out = self.variant(agg.trimmed_mean, static_argnums=1)(tree, trim)
        want = jax.tree.map(
            lambda leaf: np.sort(leaf, axis=0)[trim : leaf.shape[0] - trim].mean(axis=0), tree
        )
        chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-6)
        if trim:
            assert np.abs(np.asarray(out["lora_a"])).max() < 10.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_trimmed_mean_bf16_keeps_dtype(self):
        leaf = jnp.asarray([[1.0], [2.0], [3.0], [50.0]], jnp.bfloat16)
        out = self.variant(agg.trimmed_mean, static_argnums=1)({"w": leaf}, 1)["w"]
        chex.assert_type(out, jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(out, np.float32), [2.5])


class DpNoiseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_dp_noise_properties(self):
        dp_noise = self.variant(agg.dp_noise)
        key = jax.random.key(0)
        tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.arange(6.0).reshape(2, 3)}
        same = dp_noise(tree, 0.0, key)
        chex.assert_trees_all_equal(same, tree)
        noised = dp_noise(tree, 0.5, key)
        noise_a = np.asarray(noised["a"] - tree["a"])
        noise_b = np.asarray(noised["b"] - tree["b"])
        assert not np.allclose(noise_a, noise_b)  # equal shapes, independent keys
        again = jax.jit(agg.dp_noise)(tree, 0.5, key)
        np.testing.assert_allclose(again["a"], noised["a"], rtol=1e-6)
        other = dp_noise(tree, 0.5, jax.random.key(1))
        assert not np.allclose(other["a"], noised["a"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_dp_noise_statistics_and_dtype(self):
        big = {"w": jnp.zeros((200, 100), jnp.bfloat16), "u": jnp.zeros((20000,))}
        noised = self.variant(agg.dp_noise)(big, 0.3, jax.random.key(2))
        chex.assert_type(noised["w"], jnp.bfloat16)
        for leaf in jax.tree.leaves(noised):
            sample = np.asarray(leaf, np.float32)
            assert abs(sample.mean()) < 0.3 * 4 / np.sqrt(sample.size)  # 4 standard errors
            np.testing.assert_allclose(sample.std(), 0.3, rtol=0.03)


# ---------------------------------------------------------------- validation


def test_unknown_optimizer_lists_choices():
    with pytest.raises(ValueError, match=r"name must be one of .*fedavgm.*fedadam.*fedyogi"):
        agg.server_optimizer("adam", 1.0)


@pytest.mark.parametrize(
    "arg, value", [("lr", 0.0), ("b1", 1.5), ("b2", -0.1), ("tau", 0.0), ("v0", -1.0)]
)
def test_bad_hyperparameters_name_the_argument(arg, value):
    kwargs = {"lr": 1.0, arg: value}
    with pytest.raises(ValueError, match=rf"^{arg} must lie in"):
        agg.server_optimizer("fedadam", **kwargs)


def test_client_count_mismatches_name_both_arguments():
    tree = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3,))}
    with pytest.raises(ValueError, match=r"weights must have shape \[C\] = \[3\].*stacked_tree"):
        agg.weighted_mean(tree, jnp.ones(4))
    with pytest.raises(ValueError, match=r"stacked_tree leaves must share one leading client axis"):
        agg.weighted_mean({"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))}, jnp.ones(3))
    with pytest.raises(ValueError, match=r"stacked_tree\['a'\] must have a leading client axis"):
        agg.trimmed_mean({"a": jnp.zeros(())}, 0)
    server = {"a": jnp.zeros(2), "b": jnp.zeros(())}
    opt = agg.server_optimizer("fedavg", 1.0)
    wrong_shape = r"client_params\['a'\] must have shape \[C, ...\] = \(3, 2\)"
    with pytest.raises(ValueError, match=wrong_shape):
        agg.fedavg(server, {"a": jnp.zeros((3, 5)), "b": jnp.zeros(3)}, jnp.ones(3))
    with pytest.raises(ValueError, match=r"client_params must have the tree structure"):
        agg.server_update(server, opt.init(server), {"a": jnp.zeros((3, 2))}, jnp.ones(3), opt)
    with pytest.raises(ValueError, match=r"weights must have shape \[C\] = \[3\].*client_params"):
        clients = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(3)}
        agg.server_update(server, opt.init(server), clients, jnp.ones((3, 1)), opt)


@pytest.mark.parametrize("trim", [2, -1, 1.0, True])
def test_trimmed_mean_rejects_bad_trim(trim):
    with pytest.raises(ValueError, match=r"^trim must"):
        agg.trimmed_mean({"a": jnp.zeros((4, 2))}, trim)


def test_clip_and_noise_reject_bad_scalars():
    with pytest.raises(ValueError, match=r"^max_norm must lie in"):
        agg.clip_update({"a": jnp.ones(2)}, 0.0)
    with pytest.raises(ValueError, match=r"^stddev must lie in"):
        agg.dp_noise({"a": jnp.ones(2)}, -1.0, jax.random.key(0))
