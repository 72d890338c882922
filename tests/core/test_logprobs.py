"""Tests for fedsp.core.logprobs against an independent numpy log-softmax.

Golden-value tests are `chex.TestCase` methods under `chex.variants`: each runs once
eagerly and once under `jax.jit` (pytest ids end in ``__without_jit`` / ``__with_jit``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from fedsp.core import logprobs


def _np_token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.take_along_axis(log_softmax, targets[..., None], axis=-1)[..., 0]


def _batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 7)).astype(np.float32) * 3.0
    targets = rng.integers(0, 7, size=(2, 4)).astype(np.int32)
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    return logits, targets, mask


class TokenLogprobsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_matches_numpy(self):
        logits, targets, _ = _batch()
        got = self.variant(logprobs.token_logprobs)(jnp.asarray(logits), jnp.asarray(targets))
        chex.assert_shape(got, (2, 4))
        chex.assert_type(got, jnp.float32)
        np.testing.assert_allclose(got, _np_token_logprobs(logits, targets), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_hand_value(self):
        token_logprobs = self.variant(logprobs.token_logprobs)
        # logits [0, log 3] → softmax [1/4, 3/4].
        logits = jnp.array([[[0.0, np.log(3.0)]]])
        np.testing.assert_allclose(
            token_logprobs(logits, jnp.array([[1]])), [[np.log(0.75)]], rtol=1e-6
        )
        np.testing.assert_allclose(
            token_logprobs(logits, jnp.array([[0]])), [[np.log(0.25)]], rtol=1e-6
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_bf16_logits_use_float32(self):
        logits, targets, _ = _batch()
        logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
        got = self.variant(logprobs.token_logprobs)(logits_bf16, jnp.asarray(targets))
        chex.assert_type(got, jnp.float32)
        # Exact float64 log-softmax of the bf16-rounded logits: a bf16 log-softmax would be
        # off by ~1e-2 here, the float32 one by ~1e-6.
        want = _np_token_logprobs(np.asarray(logits_bf16.astype(jnp.float32)), targets)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_stable_for_huge_logits(self):
        logits = jnp.array([[[1e4, 1e4 - 2.0, -1e4]]], jnp.float32)
        got = self.variant(logprobs.token_logprobs)(logits, jnp.array([[1]]))
        # A naive exp(logits) overflows to inf; float32 spacing at 1e4 bounds the error.
        np.testing.assert_allclose(got, [[-2.0 - np.log1p(np.exp(-2.0))]], atol=2e-3)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_out_of_range_target_is_nan(self):
        got = self.variant(logprobs.token_logprobs)(
            jnp.zeros((1, 3, 3)), jnp.array([[5, -1, -100]])
        )
        assert np.isnan(np.asarray(got)).all()

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_logprobs_gradient_is_onehot_minus_softmax(self):
        logits, targets, _ = _batch()
        grad = self.variant(
            jax.grad(lambda x: logprobs.token_logprobs(x, jnp.asarray(targets)).sum())
        )(jnp.asarray(logits))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        onehot = np.eye(7)[targets]
        np.testing.assert_allclose(grad, onehot - probs, atol=1e-6)


class SequenceLogprobsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_sequence_logprobs_sum_and_average(self):
        logits, targets, mask = _batch()
        sequence_logprobs = self.variant(logprobs.sequence_logprobs, static_argnames="average")
        token_lp = _np_token_logprobs(logits, targets)
        want_sum = (token_lp * mask).sum(-1)
        want_avg = want_sum / mask.sum(-1)
        args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
        np.testing.assert_allclose(sequence_logprobs(*args), want_sum, rtol=1e-5)
        np.testing.assert_allclose(sequence_logprobs(*args, average=True), want_avg, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sequence_logprobs_empty_row_is_zero_and_padding_ids_ignored(self):
        logits, targets, mask = _batch()
        sequence_logprobs = self.variant(logprobs.sequence_logprobs, static_argnames="average")
        mask = mask.copy()
        mask[1] = 0.0
        targets = np.where(mask > 0, targets, -100)  # Hugging Face style label padding.
        for average in (False, True):
            got = sequence_logprobs(
                jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask.astype(bool)), average
            )
            assert np.isfinite(np.asarray(got)).all()
            assert got[1] == 0.0
        token_lp = _np_token_logprobs(logits, np.where(mask > 0, targets, 0))
        np.testing.assert_allclose(
            sequence_logprobs(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))[0],
            (token_lp * mask)[0].sum(),
            rtol=1e-5,
        )


def test_sequence_logprobs_jit_matches_eager():
    logits, targets, mask = (jnp.asarray(x) for x in _batch())
    fn = jax.jit(logprobs.sequence_logprobs, static_argnames="average")
    for average in (False, True):
        np.testing.assert_allclose(
            fn(logits, targets, mask, average=average),
            logprobs.sequence_logprobs(logits, targets, mask, average),
            rtol=1e-6,
        )


def test_sequence_logprobs_check_grads():
    logits, targets, mask = _batch()
    with jax.enable_x64(True):
        check_grads(
            jax.jit(
                lambda x: logprobs.sequence_logprobs(
                    x, jnp.asarray(targets), jnp.asarray(mask), average=True
                )
            ),
            (jnp.asarray(logits, jnp.float64),),
            order=1,
            modes=("fwd", "rev"),
        )


@pytest.mark.parametrize(
    ("logits_shape", "targets", "mask_shape", "message"),
    [
        ((2, 4), np.zeros((2, 4), np.int32), (2, 4), r"logits must have rank 3 \[B, T, V\]"),
        (
            (2, 4, 7),
            np.zeros((2, 5), np.int32),
            (2, 4),
            r"targets must have shape \[B, T\] = \[2, 4\], got \(2, 5\)",
        ),
        ((2, 4, 7), np.zeros((2, 4), np.float32), (2, 4), r"targets must have an integer dtype"),
        ((2, 4, 7), np.zeros((2, 4), np.int32), (4, 2), r"mask must have shape \[B, T\] = \[2, 4"),
    ],
)
def test_bad_inputs_raise(logits_shape, targets, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        logprobs.sequence_logprobs(
            jnp.zeros(logits_shape), jnp.asarray(targets), jnp.ones(mask_shape)
        )


def test_token_logprobs_validates_under_jit():
    message = r"targets must have shape \[B, T\] = \[1, 2\], got \(1, 3\)"
    with pytest.raises(ValueError, match=message):
        jax.jit(logprobs.token_logprobs)(jnp.zeros((1, 2, 3)), jnp.zeros((1, 3), jnp.int32))
