"""Tests for fedsp.core.losses: numpy references, hand values, gradients, jit parity.

Golden-value tests are `chex.TestCase` methods under `chex.variants`: each runs once
eagerly and once under `jax.jit` (pytest ids end in ``__without_jit`` / ``__with_jit``).
The input builders are plain functions rather than pytest fixtures, which a
`unittest.TestCase` method cannot request.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from fedsp.core import losses


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _tokens():
    rng = np.random.default_rng(0)
    logps = -rng.exponential(1.0, size=(3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], np.float32)
    return logps, mask


def _pairs():
    rng = np.random.default_rng(1)
    return tuple(-rng.uniform(5.0, 20.0, size=4).astype(np.float32) for _ in range(4))


# sft_loss --------------------------------------------------------------------------


class SftLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sft_loss_hand_value(self):
        sft_loss = self.variant(losses.sft_loss)
        logps = jnp.array([[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]])
        mask = jnp.array([[1, 1, 0], [1, 0, 0]])
        loss, metrics = sft_loss(logps, mask)
        np.testing.assert_allclose(loss, 3.5 / 3)
        np.testing.assert_allclose(metrics["nll_sum"], 3.5)
        assert metrics["num_tokens"] == 3.0
        weighted, metrics = sft_loss(logps, mask, jnp.array([2.0, 4.0]))
        # Denominator stays the token count: (2·3 + 4·0.5) / 3.
        np.testing.assert_allclose(weighted, 8.0 / 3, rtol=1e-6)
        np.testing.assert_allclose(metrics["nll"], 3.5 / 3, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sft_loss_ignores_nan_padding_and_empty_mask_is_zero(self):
        sft_loss = self.variant(losses.sft_loss)
        logps, mask = _tokens()
        padded = np.where(mask > 0, logps, np.nan)
        loss, _ = sft_loss(jnp.asarray(padded), jnp.asarray(mask))
        np.testing.assert_allclose(loss, -(logps * mask).sum() / mask.sum(), rtol=1e-6)
        grad = self.variant(jax.grad(lambda x: losses.sft_loss(x, jnp.asarray(mask))[0]))(
            jnp.asarray(padded)
        )
        np.testing.assert_allclose(grad, -mask / mask.sum(), rtol=1e-6)
        empty, metrics = sft_loss(jnp.asarray(logps), jnp.zeros_like(mask))
        assert empty == 0.0 and metrics["nll"] == 0.0


def test_sft_loss_check_grads():
    logps, mask = _tokens()
    with jax.enable_x64(True):
        check_grads(
            jax.jit(lambda x, w: losses.sft_loss(x, jnp.asarray(mask), w)[0]),
            (jnp.asarray(logps, jnp.float64), jnp.array([0.5, 1.0, 2.0], jnp.float64)),
            order=2,
            modes=("rev",),
        )


# unlikelihood_loss -----------------------------------------------------------------


def _np_unlikelihood(logps, mask, margin, confidence):
    p = np.exp(logps.astype(np.float64))
    p = np.minimum(p, 1 - 1e-7)
    active = (mask > 0) & (p > margin)
    ul = np.where(active, -np.log1p(-p), 0.0)
    rows = (mask > 0).any(-1)
    return ul.sum() / max(mask.sum(), 1) * confidence[rows].mean()


class UnlikelihoodLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_unlikelihood_hand_value(self):
        # p = 0.9 (active), 0.3 (≤ margin: ignored), 0.99 (masked out); 2 masked tokens.
        logps = jnp.log(jnp.array([[0.9, 0.3, 0.99]]))
        mask = jnp.array([[1, 1, 0]])
        loss, metrics = self.variant(losses.unlikelihood_loss)(logps, mask, 0.5, jnp.array([0.5]))
        np.testing.assert_allclose(loss, -np.log(0.1) / 2 * 0.5, rtol=1e-5)
        np.testing.assert_allclose(metrics["active_frac"], 0.5)
        np.testing.assert_allclose(metrics["confidence_mean"], 0.5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unlikelihood_matches_numpy(self):
        unlikelihood_loss = self.variant(losses.unlikelihood_loss)
        logps, mask = _tokens()
        confidence = np.array([1.0, 0.5, 1.0], np.float32)
        for margin in (0.0, 0.3, 0.7):
            loss, _ = unlikelihood_loss(
                jnp.asarray(logps), jnp.asarray(mask), margin, jnp.asarray(confidence)
            )
            np.testing.assert_allclose(
                loss, _np_unlikelihood(logps, mask, margin, confidence), rtol=1e-5
            )

    @chex.variants(with_jit=True, without_jit=True)
    def test_unlikelihood_padding_rows_do_not_dilute_confidence(self):
        logps, mask = _tokens()
        mask = mask.copy()
        mask[2] = 0.0
        loss, metrics = self.variant(losses.unlikelihood_loss)(
            jnp.asarray(logps), jnp.asarray(mask), 0.0, jnp.array([1.0, 0.5, 0.0])
        )
        np.testing.assert_allclose(metrics["confidence_mean"], 0.75)
        np.testing.assert_allclose(
            loss, _np_unlikelihood(logps, mask, 0.0, np.array([1.0, 0.5, 0.0])), rtol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("0", 0.0),
        ("minus_1e-12", -1e-12),
        ("minus_1e-9", -1e-9),
        ("minus_1e-6", -1e-6),
        ("minus_1e-3", -1e-3),
    )
    def test_unlikelihood_finite_as_p_goes_to_one(self, logp):
        logps = jnp.array([[logp, -0.01]])
        mask = jnp.ones((1, 2))
        fn = lambda x: losses.unlikelihood_loss(x, mask, 0.5, jnp.ones(1))[0]  # noqa: E731
        value, grad = self.variant(jax.value_and_grad(fn))(logps)
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
        # The clamp bounds each token's term by −log(1e-7) ≈ 16.12.
        assert float(value) <= (-np.log(1e-7) - np.log(-np.expm1(-0.01))) / 2 + 1e-3
        np.testing.assert_allclose(grad[0, 1], np.exp(-0.01) / -np.expm1(-0.01) / 2, rtol=1e-4)

    @chex.variants(with_jit=True, without_jit=True)
    def test_unlikelihood_empty_mask_is_zero(self):
        logps, _ = _tokens()
        loss, metrics = self.variant(losses.unlikelihood_loss)(
            jnp.asarray(logps), jnp.zeros((3, 5)), 0.1, jnp.ones(3)
        )
        assert loss == 0.0 and metrics["active_frac"] == 0.0


def test_unlikelihood_check_grads():
    _, mask = _tokens()
    # p in [0.05, 0.8]: −log(1 − p) is steep near p = 1, where finite differences lose
    # accuracy; margin 0 keeps every token away from the p = margin kink.
    probs = np.random.default_rng(5).uniform(0.05, 0.8, size=mask.shape)
    with jax.enable_x64(True):
        check_grads(
            jax.jit(lambda x: losses.unlikelihood_loss(x, jnp.asarray(mask), 0.0, jnp.ones(3))[0]),
            (jnp.log(jnp.asarray(probs, jnp.float64)),),
            order=2,
            modes=("rev",),
        )


# spear_loss ------------------------------------------------------------------------


class SpearLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_spear_loss_combines_terms(self):
        logps, mask = _tokens()
        lose = np.log(np.array([[0.9, 0.8, 0.2, 0.95]], np.float32))
        lose_mask = np.array([[1, 1, 1, 0]], np.float32)
        loss, metrics = self.variant(losses.spear_loss)(
            jnp.asarray(logps),
            jnp.asarray(mask),
            jnp.asarray(lose),
            jnp.asarray(lose_mask),
            jnp.array([0.5]),
            1.0,
            0.3,
            0.5,
        )
        sft = -(logps * mask).sum() / mask.sum()
        ul = (-np.log(0.1) - np.log(0.2)) / 3 * 0.5
        np.testing.assert_allclose(metrics["sft_loss"], sft, rtol=1e-5)
        np.testing.assert_allclose(metrics["ul_loss"], ul, rtol=1e-5)
        np.testing.assert_allclose(loss, sft + 0.3 * ul, rtol=1e-5)
        assert metrics["win_tokens"] == mask.sum() and metrics["lose_tokens"] == 3.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_spear_loss_empty_lose_batch(self):
        logps, mask = _tokens()
        win_weights = jnp.array([1.0, 2.0, 0.5])
        loss, metrics = self.variant(losses.spear_loss)(
            jnp.asarray(logps),
            jnp.asarray(mask),
            jnp.zeros((2, 4)),
            jnp.zeros((2, 4)),
            jnp.ones(2),
            0.7,
            1.0,
            0.5,
            win_weights,
        )
        sft, _ = losses.sft_loss(jnp.asarray(logps), jnp.asarray(mask), win_weights)
        assert metrics["ul_loss"] == 0.0
        np.testing.assert_allclose(loss, 0.7 * sft, rtol=1e-6)


def test_spear_loss_check_grads():
    logps, mask = _tokens()
    lose = np.log(np.array([[0.9, 0.8, 0.6]]))
    with jax.enable_x64(True):
        check_grads(
            jax.jit(
                lambda win, lose: losses.spear_loss(
                    win, jnp.asarray(mask), lose, jnp.ones((1, 3)), jnp.ones(1), 1.0, 0.5, 0.1
                )[0]
            ),
            (jnp.asarray(logps, jnp.float64), jnp.asarray(lose, jnp.float64)),
            order=1,
            modes=("fwd", "rev"),
        )


# spin_loss / dpo_loss --------------------------------------------------------------


class PairwiseLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_spin_loss_matches_numpy(self):
        pairs = _pairs()
        pol_pos, pol_neg, ref_pos, ref_neg = pairs
        lam = 0.3
        margin = lam * ((pol_pos - ref_pos) - (pol_neg - ref_neg))
        loss, metrics = self.variant(losses.spin_loss)(*(jnp.asarray(x) for x in pairs), lam)
        np.testing.assert_allclose(loss, _softplus(-margin).mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["margin"], margin.mean(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(metrics["accuracy"], (margin > 0).mean())
        np.testing.assert_allclose(
            metrics["reward_pos"], (lam * (pol_pos - ref_pos)).mean(), rtol=1e-5
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_spin_loss_hand_value_and_stability(self):
        spin_loss = self.variant(losses.spin_loss)
        # Margin 0 → log 2; margin ±1000 → 0 and 1000, with no overflow.
        loss, _ = spin_loss(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), 1.0)
        np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
        big = jnp.array([1000.0, -1000.0])
        loss, metrics = spin_loss(big, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 1.0)
        np.testing.assert_allclose(loss, 500.0)
        np.testing.assert_allclose(metrics["accuracy"], 0.5)
        grad = self.variant(
            jax.grad(
                lambda x: losses.spin_loss(x, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 1.0)[0]
            )
        )(big)
        np.testing.assert_allclose(grad, [0.0, -0.5])

    @chex.variants(with_jit=True, without_jit=True)
    def test_spin_loss_mask_drops_padding_pairs(self):
        spin_loss = self.variant(losses.spin_loss)
        pairs = _pairs()
        mask = np.array([1, 0, 1, 1], bool)
        masked, metrics = spin_loss(*(jnp.asarray(x) for x in pairs), 0.5, jnp.asarray(mask))
        subset, _ = spin_loss(*(jnp.asarray(x[mask]) for x in pairs), 0.5)
        np.testing.assert_allclose(masked, subset, rtol=1e-6)
        assert metrics["num_pairs"] == 3.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_dpo_loss_label_smoothing_matches_numpy(self):
        dpo_loss = self.variant(losses.dpo_loss)
        pairs = _pairs()
        pol_c, pol_r, ref_c, ref_r = pairs
        beta, eps = 0.1, 0.2
        logits = beta * ((pol_c - ref_c) - (pol_r - ref_r))
        want = ((1 - eps) * _softplus(-logits) + eps * _softplus(logits)).mean()
        loss, _ = dpo_loss(*(jnp.asarray(x) for x in pairs), beta, eps)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        plain, _ = dpo_loss(*(jnp.asarray(x) for x in pairs), beta)
        spin, _ = self.variant(losses.spin_loss)(*(jnp.asarray(x) for x in pairs), beta)
        np.testing.assert_allclose(plain, spin, rtol=1e-6)


def test_pairwise_losses_check_grads():
    pairs = _pairs()
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x, jnp.float64) for x in pairs)
        spin = jax.jit(lambda *a: losses.spin_loss(*a, 0.3)[0])
        dpo = jax.jit(lambda *a: losses.dpo_loss(*a, 0.1, 0.1)[0])
        check_grads(spin, args, order=2, modes=("rev",))
        check_grads(dpo, args, order=1, modes=("fwd", "rev"))


# tpaw_loss -------------------------------------------------------------------------


def _np_tpaw(pol_pos, pol_neg, players_pos, players_neg, player_mask, lam, eta, gamma):
    live = player_mask.astype(bool)
    rp = lam * (pol_pos[None] - players_pos[live])
    rn = lam * (pol_neg[None] - players_neg[live])
    alpha = np.where(rp <= 0, eta, 1.0)
    logits = -gamma * (rp - rn)
    beta = np.exp(logits - logits.max(0))
    beta /= beta.sum(0)
    return (beta * _softplus(-(alpha * rp - rn))).sum(0).mean()


def _team():
    rng = np.random.default_rng(2)
    pol_pos = -rng.uniform(5, 15, size=4)
    pol_neg = -rng.uniform(5, 15, size=4)
    players_pos = pol_pos[None] + rng.normal(scale=2.0, size=(3, 4))
    players_neg = pol_neg[None] + rng.normal(scale=2.0, size=(3, 4))
    players_pos[0, 0] = pol_pos[0]  # P = 0 exactly: must take eta
    return tuple(x.astype(np.float32) for x in (pol_pos, pol_neg, players_pos, players_neg))


class TpawLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_tpaw_loss_matches_numpy_with_masked_player(self):
        pol_pos, pol_neg, players_pos, players_neg = _team()
        mask = np.array([1, 0, 1])
        want = _np_tpaw(pol_pos, pol_neg, players_pos, players_neg, mask, 0.5, 2.0, 1.5)
        players_pos = players_pos.copy()
        players_pos[1] = np.nan  # an empty pool slot
        args = tuple(jnp.asarray(x) for x in (pol_pos, pol_neg, players_pos, players_neg, mask))
        loss, metrics = self.variant(losses.tpaw_loss)(*args, 0.5, 2.0, 1.5)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        assert metrics["num_players"] == 2.0
        grads = self.variant(
            jax.grad(lambda p, n: losses.tpaw_loss(p, n, *args[2:], 0.5, 2.0, 1.5)[0], (0, 1))
        )(*args[:2])
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tpaw_reward_exactly_zero_takes_eta(self):
        team = _team()
        _, pol_neg, _, players_neg = team
        args = tuple(jnp.asarray(x[:1, :1] if x.ndim == 2 else x[:1]) for x in team)
        loss, metrics = self.variant(losses.tpaw_loss)(*args, jnp.ones(1), 0.5, 3.0, 1.0)
        rn = 0.5 * (pol_neg[0] - players_neg[0, 0])
        # P(y⁺) = 0, so α·P(y⁺) = 0 whatever eta: the loss is softplus(rn), eta_frac is 1.
        np.testing.assert_allclose(loss, _softplus(rn), rtol=1e-5)
        assert metrics["eta_frac"] == 1.0
        # α shows in the gradient: d/dpol_pos softplus(−(α·P⁺ − P⁻)) = −sigmoid(P⁻ − α·P⁺)·α·λ.
        grad = self.variant(
            jax.grad(lambda p: losses.tpaw_loss(p, *args[1:], jnp.ones(1), 0.5, 3.0, 1.0)[0])
        )(args[0])
        np.testing.assert_allclose(grad, [-3.0 * 0.5 / (1.0 + np.exp(-rn))], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tpaw_single_player_eta_one_is_spin(self):
        pol_pos, pol_neg, ref_pos, ref_neg = (jnp.asarray(x) for x in _pairs())

        def tpaw(p, n):
            return losses.tpaw_loss(p, n, ref_pos[None], ref_neg[None], jnp.ones(1), 0.3, 1.0, 2.0)

        def spin(p, n):
            return losses.spin_loss(p, n, ref_pos, ref_neg, 0.3)

        (t_loss, t_metrics), t_grads = self.variant(jax.value_and_grad(tpaw, (0, 1), has_aux=True))(
            pol_pos, pol_neg
        )
        (s_loss, s_metrics), s_grads = self.variant(jax.value_and_grad(spin, (0, 1), has_aux=True))(
            pol_pos, pol_neg
        )
        np.testing.assert_allclose(t_loss, s_loss, rtol=1e-6)
        for key in ("reward_pos", "reward_neg", "margin", "accuracy"):
            np.testing.assert_allclose(t_metrics[key], s_metrics[key], rtol=1e-6, atol=1e-7)
        for tg, sg in zip(t_grads, s_grads):
            np.testing.assert_allclose(tg, sg, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tpaw_gradient_treats_weights_as_constants(self):
        team = _team()
        pol_pos, pol_neg, players_pos, players_neg = team
        lam, eta, gamma = 0.5, 2.0, 1.5
        rp = lam * (pol_pos[None] - players_pos)
        rn = lam * (pol_neg[None] - players_neg)
        alpha = np.where(rp <= 0, eta, 1.0)
        logits = -gamma * (rp - rn)
        beta = np.exp(logits - logits.max(0))
        beta /= beta.sum(0)
        # d/dpol_pos of mean_B Σ_j β_j softplus(−(α_j rp_j − rn_j)) with α, β fixed.
        sig = 1.0 / (1.0 + np.exp(alpha * rp - rn))
        want_pos = (beta * -sig * alpha * lam).sum(0) / 4
        want_neg = (beta * sig * lam).sum(0) / 4
        args = tuple(jnp.asarray(x) for x in team)
        grads = self.variant(
            jax.grad(
                lambda p, n: losses.tpaw_loss(p, n, *args[2:], jnp.ones(3), lam, eta, gamma)[0],
                (0, 1),
            )
        )(*args[:2])
        np.testing.assert_allclose(grads[0], want_pos, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(grads[1], want_neg, rtol=1e-4, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    def test_tpaw_all_players_masked_is_zero(self):
        args = tuple(jnp.asarray(x) for x in _team())
        value, grads = self.variant(
            jax.value_and_grad(
                lambda p: losses.tpaw_loss(
                    p, args[1], args[2], args[3], jnp.zeros(3), 0.5, 2.0, 1.0
                )[0]
            )
        )(args[0])
        assert value == 0.0
        np.testing.assert_array_equal(grads, np.zeros(4))


def test_tpaw_check_grads():
    # gamma = 0 and eta = 1 make β and α locally constant, so finite differences agree.
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(x, jnp.float64) for x in _team())
        player_mask = jnp.array([1, 1, 0])
        check_grads(
            jax.jit(lambda p, n: losses.tpaw_loss(p, n, *args[2:], player_mask, 0.5, 1.0, 0.0)[0]),
            args[:2],
            order=2,
            modes=("rev",),
        )


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ((4, 4, (3, 5), (3, 4), 3), r"players_pos must have shape \[J, B\] = \[3, 4\], got \(3, 5"),
        ((4, 4, (3, 4), (2, 4), 3), r"players_neg must have shape \[J, B\] = \[3, 4\], got \(2, 4"),
        ((4, 4, (3, 4), (3, 4), 4), r"player_mask must have shape \[J\] = \[3\], got \(4,\)"),
        ((4, 3, (3, 4), (3, 4), 3), r"pol_neg must have shape \[B\] = \[4\], got \(3,\)"),
        ((4, 4, (4,), (3, 4), 3), r"players_pos must have rank 2 \[J, B\], got shape \(4,\)"),
    ],
)
def test_tpaw_bad_shapes(shapes, message):
    pol_pos, pol_neg, players_pos, players_neg, num_players = shapes
    with pytest.raises(ValueError, match=message):
        losses.tpaw_loss(
            jnp.zeros(pol_pos),
            jnp.zeros(pol_neg),
            jnp.zeros(players_pos),
            jnp.zeros(players_neg),
            jnp.ones(num_players),
            1.0,
            1.0,
            1.0,
        )


# grpo_loss -------------------------------------------------------------------------


def _np_grpo(logps, old, ref, adv, mask, clip_eps, kl_coef):
    ratio = np.exp(logps - old)
    clipped = np.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = np.minimum(ratio * adv[:, None], clipped * adv[:, None])
    kl = np.exp(ref - logps) - (ref - logps) - 1
    per_token = (surrogate - kl_coef * kl) * mask
    n = mask.sum(-1)
    rows = n > 0
    return -(per_token.sum(-1)[rows] / n[rows]).mean()


def _rollout():
    rng = np.random.default_rng(4)
    logps = -rng.uniform(0.1, 3.0, size=(3, 4))
    old = logps + rng.normal(scale=0.3, size=(3, 4))
    ref = logps + rng.normal(scale=0.3, size=(3, 4))
    adv = np.array([1.0, -0.5, 2.0])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    return tuple(x.astype(np.float32) for x in (logps, old, ref, adv, mask))


class GrpoLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_loss_matches_numpy(self):
        rollout = _rollout()
        loss, metrics = self.variant(losses.grpo_loss)(
            *(jnp.asarray(x) for x in rollout), 0.2, 0.05
        )
        np.testing.assert_allclose(loss, _np_grpo(*rollout, 0.2, 0.05), rtol=1e-5)
        logps, old, ref, adv, mask = rollout
        ratio = np.exp(logps - old)
        kl = np.exp(ref - logps) - (ref - logps) - 1
        clipped = np.clip(ratio, 0.8, 1.2) * adv[:, None] < ratio * adv[:, None]
        np.testing.assert_allclose(metrics["ratio"], (ratio * mask).sum() / mask.sum(), rtol=1e-5)
        np.testing.assert_allclose(metrics["kl"], (kl * mask).sum() / mask.sum(), rtol=1e-5)
        np.testing.assert_allclose(
            metrics["clip_frac"], (clipped * mask).sum() / mask.sum(), rtol=1e-6
        )
        assert 0.0 < float(metrics["clip_frac"]) < 1.0  # the rollout exercises both branches

    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_loss_hand_value_sequence_then_batch_mean(self):
        # On-policy, ref = policy: ratio 1, KL 0, per token surrogate = A. Sequence means are
        # 1 and −2 → loss −(1 − 2)/2 = 0.5; a token mean over all 3 tokens would give 0.
        logps = jnp.array([[-1.0, -1.0], [-2.0, -3.0]])
        mask = jnp.array([[1, 1], [1, 0]])
        loss, metrics = self.variant(losses.grpo_loss)(
            logps, logps, logps, jnp.array([1.0, -2.0]), mask, 0.2, 0.1
        )
        np.testing.assert_allclose(loss, 0.5)
        assert metrics["kl"] == 0.0 and metrics["ratio"] == 1.0 and metrics["clip_frac"] == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_loss_kl_golden_and_empty_rows(self):
        grpo_loss = self.variant(losses.grpo_loss)
        rollout = _rollout()
        logps, old, ref, adv, mask = rollout
        # Zero advantages leave only kl_coef·k3; k3 at log(ref/π) = 1 is e − 2.
        one = jnp.zeros((2, 1))
        loss, _ = grpo_loss(one, one, one + 1.0, jnp.zeros(2), jnp.ones((2, 1)), 0.2, 0.5)
        np.testing.assert_allclose(loss, 0.5 * (np.e - 2.0), rtol=1e-6)
        padded_mask = np.concatenate([mask, np.zeros((1, 4), np.float32)])
        padded = [np.concatenate([x, x[:1] * 0 + np.inf]) for x in (logps, old, ref)]
        padded_adv = np.append(adv, 1.0)
        padded_loss, metrics = grpo_loss(
            *(jnp.asarray(x) for x in padded),
            jnp.asarray(padded_adv),
            jnp.asarray(padded_mask),
            0.2,
            0.05,
        )
        np.testing.assert_allclose(padded_loss, _np_grpo(*rollout, 0.2, 0.05), rtol=1e-5)
        assert metrics["num_sequences"] == 3.0
        empty, _ = grpo_loss(*(jnp.asarray(x) for x in rollout[:4]), jnp.zeros((3, 4)), 0.2, 0.05)
        assert empty == 0.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_grpo_on_policy_gradient_is_advantage_weighted_score(self):
        logps, _, _, adv, mask = _rollout()
        grad = self.variant(
            jax.grad(
                lambda x: losses.grpo_loss(
                    x,
                    jax.lax.stop_gradient(x),
                    jnp.asarray(logps),
                    jnp.asarray(adv),
                    jnp.asarray(mask),
                    0.2,
                    0.0,
                )[0]
            )
        )(jnp.asarray(logps))
        # ratio = 1: dL/dlogπ_{b,t} = −A_b·mask_{b,t} / (|o_b|·B).
        want = -adv[:, None] * mask / mask.sum(-1, keepdims=True) / 3
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_grpo_check_grads():
    logps, old, ref, adv, mask = _rollout()
    with jax.enable_x64(True):
        # clip_eps = 10 keeps every ratio strictly inside the clip range (no kinks).
        check_grads(
            jax.jit(
                lambda x: losses.grpo_loss(
                    x,
                    jnp.asarray(old, jnp.float64),
                    jnp.asarray(ref, jnp.float64),
                    jnp.asarray(adv, jnp.float64),
                    jnp.asarray(mask),
                    10.0,
                    0.1,
                )[0]
            ),
            (jnp.asarray(logps, jnp.float64),),
            order=2,
            modes=("rev",),
        )


def test_grpo_bad_inputs():
    logps, old, ref, adv, mask = (jnp.asarray(x) for x in _rollout())
    with pytest.raises(ValueError, match=r"adv must have shape \[B\] = \[3\], got \(4,\)"):
        losses.grpo_loss(logps, old, ref, jnp.zeros(4), mask, 0.2, 0.0)
    with pytest.raises(ValueError, match=r"old_logps must have shape \[B, T\] = \[3, 4\]"):
        losses.grpo_loss(logps, old[:, :2], ref, adv, mask, 0.2, 0.0)
    with pytest.raises(ValueError, match=r"clip_eps must lie in \[0.0, inf\), got -0.1"):
        losses.grpo_loss(logps, old, ref, adv, mask, -0.1, 0.0)


# all losses ------------------------------------------------------------------------


def test_every_loss_jit_matches_eager():
    logps, mask = (jnp.asarray(x) for x in _tokens())
    pair_args = tuple(jnp.asarray(x) for x in _pairs())
    team_args = tuple(jnp.asarray(x) for x in _team())
    cases = [
        (losses.sft_loss, (logps, mask, jnp.array([1.0, 0.5, 2.0]))),
        (losses.unlikelihood_loss, (logps, mask, 0.2, jnp.array([1.0, 0.5, 1.0]))),
        (losses.spear_loss, (logps, mask, logps, mask, jnp.ones(3), 1.0, 0.5, 0.2)),
        (losses.spin_loss, (*pair_args, 0.3)),
        (losses.dpo_loss, (*pair_args, 0.1, 0.1)),
        (losses.tpaw_loss, (*team_args, jnp.array([1, 0, 1]), 0.5, 2.0, 1.5)),
        (losses.grpo_loss, (*(jnp.asarray(x) for x in _rollout()), 0.2, 0.05)),
    ]
    for fn, args in cases:
        eager_loss, eager_metrics = fn(*args)
        jit_loss, jit_metrics = jax.jit(fn)(*args)
        np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-5, err_msg=fn.__name__)
        assert jit_metrics.keys() == eager_metrics.keys()
        for key, value in eager_metrics.items():
            assert jnp.shape(value) == (), (fn.__name__, key)
            np.testing.assert_allclose(jit_metrics[key], value, rtol=1e-5, atol=1e-7)


def test_token_loss_bad_inputs():
    with pytest.raises(ValueError, match=r"token_logps must have rank 2 \[B, T\]"):
        losses.sft_loss(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"mask must have shape \[B, T\] = \[2, 3\], got \(3, 2\)"):
        losses.sft_loss(jnp.zeros((2, 3)), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"weights must have shape \[B\] = \[2\]"):
        losses.sft_loss(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"confidence must have shape \[B\] = \[2\]"):
        losses.unlikelihood_loss(jnp.zeros((2, 3)), jnp.ones((2, 3)), 0.5, jnp.ones(3))
    with pytest.raises(ValueError, match=r"margin must lie in \[0.0, 1.0\), got 1.0"):
        losses.unlikelihood_loss(jnp.zeros((2, 3)), jnp.ones((2, 3)), 1.0, jnp.ones(2))
    with pytest.raises(ValueError, match=r"lose_mask must have shape \[B, T\] = \[1, 3\]"):
        losses.spear_loss(
            jnp.zeros((2, 3)),
            jnp.ones((2, 3)),
            jnp.zeros((1, 3)),
            jnp.ones((1, 4)),
            jnp.ones(1),
            1.0,
            1.0,
            0.5,
        )
    with pytest.raises(ValueError, match=r"ref_rejected must have shape \[B\] = \[2\]"):
        losses.dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(3), 0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0.0, 0.5\]"):
        losses.dpo_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 0.1, 0.7)
    with pytest.raises(ValueError, match=r"mask must have shape \[B\] = \[2\]"):
        losses.spin_loss(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2), 0.1, jnp.ones(3))
