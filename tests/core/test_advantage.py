"""Tests for fedsp.core.advantage: golden values, invariants and gradients.

Golden-value tests are `chex.TestCase` methods under `chex.variants`: each runs once
eagerly and once under `jax.jit` (pytest ids end in ``__without_jit`` / ``__with_jit``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from fedsp.core import advantage


class AdvantagesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_advantages_scalar_and_per_sample_baseline(self):
        advantages = self.variant(advantage.advantages)
        rewards = jnp.array([1.0, 0.0, 0.5])
        np.testing.assert_allclose(advantages(rewards, 0.25), [0.75, -0.25, 0.25])
        np.testing.assert_allclose(
            advantages(rewards, jnp.array([1.0, -1.0, 0.0])), [0.0, 1.0, 0.5]
        )


def test_advantages_bad_shapes():
    with pytest.raises(ValueError, match=r"rewards must have rank 1 \[B\]"):
        advantage.advantages(jnp.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match=r"baseline must have shape \[B\] = \[3\], got \(2,\)"):
        advantage.advantages(jnp.zeros(3), jnp.zeros(2))


class GroupAdvantagesTest(chex.TestCase):
    def _group_advantages(self):
        # normalize picks a Python branch: static under jit.
        return self.variant(advantage.group_advantages, static_argnames="normalize")

    @chex.variants(with_jit=True, without_jit=True)
    def test_group_advantages_golden(self):
        group_advantages = self._group_advantages()
        rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
        # Row 0: mean 0.5, unbiased std sqrt(1/3); row 1 constant; row 2: mean 0.75, std 1.5.
        std0 = np.sqrt(1.0 / 3.0)
        want = np.array(
            [
                [0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0],
                [0.0, 0.0, 0.0, 0.0],
                [2.25 / 1.5, -0.75 / 1.5, -0.75 / 1.5, -0.75 / 1.5],
            ]
        )
        np.testing.assert_allclose(group_advantages(rewards, eps=1e-12), want, rtol=1e-5)
        np.testing.assert_allclose(
            group_advantages(rewards, normalize=False),
            [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [2.25, -0.75, -0.75, -0.75]],
            rtol=1e-6,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_group_advantages_matches_numpy_with_eps(self):
        rng = np.random.default_rng(1)
        rewards = rng.normal(size=(5, 6)).astype(np.float32)
        eps = 0.1
        mean = rewards.mean(-1, keepdims=True)
        std = rewards.std(-1, ddof=1, keepdims=True)
        np.testing.assert_allclose(
            self._group_advantages()(jnp.asarray(rewards), True, eps),
            (rewards - mean) / (std + eps),
            rtol=1e-5,
            atol=1e-6,
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("3", 3.0), ("0_1", 0.1), ("minus_7_3", -7.3))
    def test_group_advantages_constant_group_is_exactly_zero(self, value):
        # float32 mean(7 × 3.0) is 3.0000002; unguarded, (r − mean)/(std + eps) gives ≈ −0.19.
        got = self._group_advantages()(jnp.full((2, 7), value, jnp.float32))
        np.testing.assert_array_equal(got, np.zeros((2, 7)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_group_advantages_single_sample_group_is_zero(self):
        got = self._group_advantages()(jnp.array([[3.0], [-1.0]]))
        np.testing.assert_array_equal(got, [[0.0], [0.0]])


def test_group_advantages_check_grads_and_constant_group_gradient():
    with jax.enable_x64(True):
        rewards = jnp.array([[1.0, 0.0, 0.5, 2.0], [0.3, -1.0, 0.7, 0.1]], jnp.float64)
        check_grads(jax.jit(advantage.group_advantages), (rewards,), order=2, modes=("rev",))
    grad = jax.grad(lambda r: jnp.sum(advantage.group_advantages(r) * jnp.arange(3.0)))(
        jnp.ones((1, 3))
    )
    np.testing.assert_array_equal(grad, np.zeros((1, 3)))


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        (3, 7),  # one shape: every new shape would recompile
        elements=st.floats(-10, 10, width=32, allow_subnormal=False),
    )
)
def test_group_advantages_rows_are_centered_and_scaled(rewards):
    got = np.asarray(advantage.group_advantages(jnp.asarray(rewards)))
    assert np.isfinite(got).all()
    spread = rewards.std(-1, ddof=1)
    # float32 rounds the mean at ~1e-7·|r|, which the normalisation scales by 1/std.
    tolerance = 1e-5 * (1.0 + np.abs(rewards).max(-1) / (spread + 1e-6))
    assert (np.abs(got.sum(-1)) <= tolerance).all()
    scaled = spread > 1e-2
    np.testing.assert_allclose(
        got[scaled].std(-1, ddof=1), spread[scaled] / (spread[scaled] + 1e-6), rtol=1e-3
    )


class EmaBaselineTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_ema_baseline_first_round_and_recursion(self):
        ema_baseline = self.variant(advantage.ema_baseline)
        first = ema_baseline(None, jnp.array([1.0, 0.0, 0.0, 1.0]), 0.9)
        np.testing.assert_allclose(first, 0.5)
        second = ema_baseline(first, jnp.array([1.0, 1.0]), 0.9)
        np.testing.assert_allclose(second, 0.9 * 0.5 + 0.1 * 1.0, rtol=1e-6)
        np.testing.assert_allclose(ema_baseline(0.3, jnp.array([2.0]), 0.0), 2.0)
        np.testing.assert_allclose(ema_baseline(0.3, jnp.array([2.0]), 1.0), 0.3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ema_baseline_empty_rewards_keep_previous(self):
        ema_baseline = self.variant(advantage.ema_baseline)
        np.testing.assert_allclose(ema_baseline(0.7, jnp.zeros((0,)), 0.5), 0.7)
        assert ema_baseline(None, jnp.zeros((0,)), 0.5) == 0.0


def test_ema_baseline_jit_matches_eager():
    rewards = jnp.array([0.2, 0.9, 0.4])
    np.testing.assert_allclose(
        jax.jit(advantage.ema_baseline)(0.1, rewards, 0.8),
        advantage.ema_baseline(0.1, rewards, 0.8),
        rtol=1e-6,
    )


def test_ema_baseline_bad_args():
    with pytest.raises(ValueError, match=r"decay must lie in \[0.0, 1.0\], got 1.5"):
        advantage.ema_baseline(None, jnp.ones(2), 1.5)
    with pytest.raises(ValueError, match=r"prev must be a scalar or None"):
        advantage.ema_baseline(jnp.ones(2), jnp.ones(2), 0.5)


class AwrWeightsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_awr_weights_golden_and_cap(self):
        adv = jnp.array([-1.0, 0.0, 0.5, 3.0])
        got = self.variant(advantage.awr_weights)(adv, 0.5, 20.0)
        want = np.minimum(np.exp(np.array([-1.0, 0.0, 0.5, 3.0]) / 0.5), 20.0)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert got[-1] == pytest.approx(20.0, rel=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_awr_weights_finite_values_and_grads_for_huge_advantages(self):
        awr_weights = self.variant(advantage.awr_weights)
        awr_grad = self.variant(jax.grad(lambda a, mw: advantage.awr_weights(a, 0.1, mw).sum()))
        adv = jnp.array([1e4, -1e4, 50.0])
        for max_weight in (20.0, jnp.inf):
            weights = awr_weights(adv, 0.1, max_weight)
            grads = awr_grad(adv, max_weight)
            assert np.isfinite(np.asarray(weights)).all()
            assert np.isfinite(np.asarray(grads)).all()
        capped = self.variant(jax.grad(lambda a: advantage.awr_weights(a, 1.0, 2.0).sum()))(
            jnp.array([5.0, 0.0])
        )
        # d/dA min(exp(A), 2): 0 on the capped side, exp(A) below the cap.
        np.testing.assert_allclose(capped, [0.0, 1.0], rtol=1e-6)


def test_awr_weights_check_grads():
    with jax.enable_x64(True):
        check_grads(
            jax.jit(lambda a: advantage.awr_weights(a, 0.7, 5.0)),
            (jnp.array([-0.3, 0.2, 0.6, 3.0], jnp.float64),),
            order=2,
            modes=("fwd", "rev"),
        )


def test_awr_weights_bad_args():
    with pytest.raises(ValueError, match=r"temperature must lie in \(0.0, inf\), got 0.0"):
        advantage.awr_weights(jnp.ones(2), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"max_weight must lie in \(0.0, inf\)"):
        advantage.awr_weights(jnp.ones(2), 1.0, -1.0)
    with pytest.raises(ValueError, match=r"adv must have rank 1 \[B\]"):
        advantage.awr_weights(jnp.ones((2, 1)), 1.0, 1.0)
