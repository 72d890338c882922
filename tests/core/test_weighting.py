"""Tests for fedsp.core.weighting: TPAW weights, SPEAR confidence, client weights.

Golden-value tests are `chex.TestCase` methods under `chex.variants`: each runs once
eagerly and once under `jax.jit` (pytest ids end in ``__without_jit`` / ``__with_jit``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsp.core import weighting


def _np_player_weights(margins: np.ndarray, gamma: float, mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(margins, dtype=np.float64)
    live = mask.astype(bool)
    if not live.any():
        return out
    logits = -gamma * margins[live].astype(np.float64)
    unnorm = np.exp(logits - logits.max(axis=0))
    out[live] = unnorm / unnorm.sum(axis=0)
    return out


# implicit_rewards ------------------------------------------------------------------


class ImplicitRewardsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_implicit_rewards_broadcast_over_players(self):
        implicit_rewards = self.variant(weighting.implicit_rewards)
        policy = jnp.array([-1.0, -2.0])
        players = jnp.array([[-1.5, -2.0], [-0.5, -4.0], [-1.0, -1.0]])
        got = implicit_rewards(policy, players, 0.1)
        np.testing.assert_allclose(got, [[0.05, 0.0], [-0.05, 0.2], [0.0, -0.1]], atol=1e-7)
        np.testing.assert_allclose(
            implicit_rewards(policy, jnp.array([0.0, -3.0]), 2.0), [-2.0, 2.0]
        )


def test_implicit_rewards_bad_shapes():
    message = r"player_logps must have shape \[J, B\] = \[J, 2\], got \(3, 4\)"
    with pytest.raises(ValueError, match=message):
        weighting.implicit_rewards(jnp.zeros(2), jnp.zeros((3, 4)), 1.0)
    with pytest.raises(ValueError, match=r"policy_logps must have rank 1 \[B\]"):
        weighting.implicit_rewards(jnp.zeros((2, 1)), jnp.zeros(2), 1.0)


# response_weights ------------------------------------------------------------------


class ResponseWeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_response_weights_eta_where_reward_not_positive(self):
        rewards = jnp.array([[-1.0, 0.0, 1e-8], [2.0, -0.0, -3.0]])
        got = self.variant(weighting.response_weights)(rewards, 1.7)
        np.testing.assert_array_equal(got, np.array([[1.7, 1.7, 1.0], [1.0, 1.7, 1.7]], np.float32))

    @chex.variants(with_jit=True, without_jit=True)
    def test_response_weights_have_no_gradient(self):
        grad = self.variant(jax.grad(lambda r: jnp.sum(weighting.response_weights(r, 3.0) * r)))(
            jnp.array([[-1.0, 2.0]])
        )
        # d/dr [α·r] with α constant is α itself.
        np.testing.assert_allclose(grad, [[3.0, 1.0]])
        with pytest.raises(ValueError, match=r"pos_rewards must have rank 2 \[J, B\]"):
            weighting.response_weights(jnp.zeros(3), 1.0)


# player_weights --------------------------------------------------------------------


class PlayerWeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_player_weights_golden_with_masked_player(self):
        margins = np.array([[0.0, 1.0], [np.log(3.0), -2.0], [5.0, 5.0]], np.float32)
        mask = np.array([1, 1, 0])
        got = np.asarray(
            self.variant(weighting.player_weights)(jnp.asarray(margins), 1.0, jnp.asarray(mask))
        )
        # Column 0: softmax(-[0, log 3]) = [3/4, 1/4]; column 1: softmax([-1, 2]).
        e = np.exp([-1.0, 2.0])
        np.testing.assert_allclose(got[:, 0], [0.75, 0.25, 0.0], rtol=1e-6)
        np.testing.assert_allclose(got[:, 1], [e[0] / e.sum(), e[1] / e.sum(), 0.0], rtol=1e-6)
        assert got[2].tolist() == [0.0, 0.0]

    @chex.variants(with_jit=True, without_jit=True)
    def test_player_weights_matches_numpy_and_ignores_nan_in_masked_slots(self):
        rng = np.random.default_rng(3)
        margins = rng.normal(size=(4, 5)).astype(np.float32) * 3
        mask = np.array([True, False, True, True])
        want = _np_player_weights(margins, 0.8, mask)
        margins[1] = np.nan  # an empty pool slot may hold anything
        got = self.variant(weighting.player_weights)(jnp.asarray(margins), 0.8, jnp.asarray(mask))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(got).sum(0), 1.0, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_player_weights_stable_for_huge_margins_and_uniform_at_gamma_zero(self):
        player_weights = self.variant(weighting.player_weights)
        margins = jnp.array([[1e4], [-1e4], [0.0]])
        got = player_weights(margins, 1.0, jnp.ones(3))
        np.testing.assert_allclose(got, [[0.0], [1.0], [0.0]])
        uniform = player_weights(margins, 0.0, jnp.array([1.0, 0.0, 1.0]))
        np.testing.assert_allclose(uniform, [[0.5], [0.0], [0.5]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_player_weights_all_masked_are_zero(self):
        got = self.variant(weighting.player_weights)(jnp.ones((3, 2)), 1.0, jnp.zeros(3, bool))
        np.testing.assert_array_equal(got, np.zeros((3, 2)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_player_weights_stop_gradient(self):
        margins = jnp.array([[0.3, -1.0], [1.2, 0.4]])
        probe = jnp.arange(4.0).reshape(2, 2)
        grad = self.variant(
            jax.grad(lambda m: jnp.sum(weighting.player_weights(m, 2.0, jnp.ones(2)) * probe))
        )(margins)
        np.testing.assert_array_equal(grad, np.zeros((2, 2)))


def test_player_weights_jit_matches_eager():
    margins = jnp.array([[0.3, -1.0], [1.2, 0.4], [0.0, 0.0]])
    mask = jnp.array([1, 0, 1])
    np.testing.assert_allclose(
        jax.jit(weighting.player_weights)(margins, 1.5, mask),
        weighting.player_weights(margins, 1.5, mask),
        rtol=1e-6,
    )


def test_player_weights_bad_mask_shape():
    with pytest.raises(ValueError, match=r"player_mask must have shape \[J\] = \[3\], got \(2,\)"):
        weighting.player_weights(jnp.zeros((3, 4)), 1.0, jnp.ones(2))


# client_weights --------------------------------------------------------------------


class ClientWeightsTest(chex.TestCase):
    def _client_weights(self):
        # mode picks a Python branch: static under jit (threshold=None passes through jit
        # as an empty pytree).
        return self.variant(weighting.client_weights, static_argnames="mode")

    @chex.variants(with_jit=True, without_jit=True)
    def test_client_weights_examples_is_fedavg(self):
        n = jnp.array([10, 30, 0, 60])
        weights, keep = self._client_weights()(n, jnp.zeros(4), "examples", 1.0, None)
        np.testing.assert_allclose(weights, [0.1, 0.3, 0.0, 0.6], rtol=1e-6)
        np.testing.assert_array_equal(keep, [True, True, False, True])

    @chex.variants(with_jit=True, without_jit=True)
    def test_client_weights_examples_with_pruning(self):
        n = jnp.array([10.0, 30.0, 20.0, 60.0])
        adv = jnp.array([0.5, -0.2, 0.0, 0.1])
        weights, keep = self._client_weights()(n, adv, "examples", 1.0, 0.0)
        np.testing.assert_array_equal(keep, [True, False, True, True])
        np.testing.assert_allclose(weights, [10 / 90, 0.0, 20 / 90, 60 / 90], rtol=1e-6)
        assert weights[1] == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_client_weights_advantage_matches_numpy(self):
        n = np.array([10.0, 30.0, 20.0, 5.0])
        adv = np.array([0.5, -0.2, 1.0, -3.0])
        weights, keep = self._client_weights()(
            jnp.asarray(n), jnp.asarray(adv), "advantage", 0.5, -1.0
        )
        unnorm = n * np.exp(adv / 0.5)
        unnorm[3] = 0.0
        np.testing.assert_allclose(weights, unnorm / unnorm.sum(), rtol=1e-5)
        np.testing.assert_array_equal(keep, [True, True, True, False])
        assert weights[3] == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_client_weights_advantage_is_stable_for_huge_advantages(self):
        weights, keep = self._client_weights()(
            jnp.array([1.0, 4.0, 2.0]),
            jnp.array([1000.0, 1000.0, -1000.0]),
            "advantage",
            1.0,
            None,
        )
        np.testing.assert_allclose(weights, [0.2, 0.8, 0.0], atol=1e-7)
        assert keep.all()

    @chex.variants(with_jit=True, without_jit=True)
    def test_client_weights_uniform(self):
        weights, keep = self._client_weights()(
            jnp.array([5, 0, 7, 1]), jnp.array([0.0, 0.0, 2.0, -2.0]), "uniform", 1.0, -1.0
        )
        np.testing.assert_allclose(weights, [0.5, 0.0, 0.5, 0.0])
        np.testing.assert_array_equal(keep, [True, False, True, False])

    @chex.variants(with_jit=True, without_jit=True)
    def test_client_weights_all_pruned_gives_zeros_not_nan(self):
        client_weights = self._client_weights()
        for mode in weighting.CLIENT_WEIGHT_MODES:
            weights, keep = client_weights(
                jnp.array([3, 4]), jnp.array([-1.0, -2.0]), mode, 1.0, 0.5
            )
            np.testing.assert_array_equal(weights, [0.0, 0.0])
            np.testing.assert_array_equal(keep, [False, False])

    @chex.variants(with_jit=True, without_jit=True)
    def test_client_weights_threshold_none_equals_minus_inf_and_nan_advantage_pruned(self):
        client_weights = self._client_weights()
        n = jnp.array([2.0, 3.0])
        adv = jnp.array([-1e30, 4.0])
        for mode in weighting.CLIENT_WEIGHT_MODES:
            a = client_weights(n, adv, mode, 1.0, None)
            b = client_weights(n, adv, mode, 1.0, -jnp.inf)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        weights, keep = client_weights(n, jnp.array([jnp.nan, 4.0]), "advantage", 1.0, None)
        np.testing.assert_array_equal(weights, [0.0, 1.0])
        np.testing.assert_array_equal(keep, [False, True])


def test_client_weights_jit_with_traced_threshold():
    fn = jax.jit(weighting.client_weights, static_argnames="mode")
    n = jnp.array([10.0, 30.0, 20.0])
    adv = jnp.array([0.5, -0.2, 1.0])
    for mode in weighting.CLIENT_WEIGHT_MODES:
        got = fn(n, adv, mode=mode, temperature=2.0, threshold=jnp.float32(0.0))
        want = weighting.client_weights(n, adv, mode, 2.0, 0.0)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        np.testing.assert_array_equal(got[1], want[1])


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.int32, 6, elements=st.integers(0, 100)),
    # XLA on CPU flushes subnormals to zero, numpy does not: keep them out.
    hnp.arrays(np.float32, 6, elements=st.floats(-50, 50, width=32, allow_subnormal=False)),
    st.sampled_from(weighting.CLIENT_WEIGHT_MODES),
    st.one_of(st.none(), st.floats(-50, 50, width=32, allow_subnormal=False)),
)
def test_client_weights_sum_to_one_over_kept(n, adv, mode, threshold):
    weights, keep = weighting.client_weights(jnp.asarray(n), jnp.asarray(adv), mode, 0.5, threshold)
    weights, keep = np.asarray(weights), np.asarray(keep)
    assert np.isfinite(weights).all() and (weights >= 0).all()
    want_keep = (n > 0) & (True if threshold is None else adv >= np.float32(threshold))
    np.testing.assert_array_equal(keep, want_keep)
    assert (weights[~keep] == 0).all()
    np.testing.assert_allclose(weights.sum(), 1.0 if keep.any() else 0.0, rtol=1e-5)


def test_client_weights_bad_args():
    choices = r"mode must be one of \('examples', 'advantage', 'uniform'\), got 'loss'"
    with pytest.raises(ValueError, match=choices):
        weighting.client_weights(jnp.ones(2), jnp.ones(2), "loss", 1.0, None)
    with pytest.raises(ValueError, match=r"client_adv must have shape \[C\] = \[2\], got \(3,\)"):
        weighting.client_weights(jnp.ones(2), jnp.ones(3), "examples", 1.0, None)
    with pytest.raises(ValueError, match=r"temperature must lie in \(0.0, inf\)"):
        weighting.client_weights(jnp.ones(2), jnp.ones(2), "advantage", -1.0, None)
    with pytest.raises(ValueError, match=r"threshold must be a scalar or None"):
        weighting.client_weights(jnp.ones(2), jnp.ones(2), "advantage", 1.0, jnp.zeros(2))


# spear_confidence ------------------------------------------------------------------


class SpearConfidenceTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_spear_confidence(self):
        spear_confidence = self.variant(weighting.spear_confidence)
        got = spear_confidence(jnp.array([True, False, True]))
        np.testing.assert_array_equal(got, np.array([1.0, 0.5, 1.0], np.float32))
        np.testing.assert_array_equal(spear_confidence(jnp.array([0.0, 1.0])), [0.5, 1.0])
        with pytest.raises(ValueError, match=r"revision_succeeded must have rank 1 \[B\]"):
            weighting.spear_confidence(jnp.ones((1, 2)))
