"""The decoder's arithmetic as pure functions on arrays.

``fedsp.model.transformer``'s NNX modules and the sampler's decode step
(``fedsp.model.decode``) both call these, so training, prefill and decoding share one
forward path: a change here changes all three alike.

Shapes: B batch, T tokens, S key slots, H query heads, K key/value heads, G = H // K,
hd head dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.model.config import ModelConfig

# Finite mask value: a query row with no visible key (a left-pad position) softmaxes to a
# uniform distribution instead of NaN, and its output is never read.
MASK_VALUE = float(np.finfo(np.float32).min)

LoRAWeights = tuple[jax.Array, jax.Array, jax.Array]  # (A [in, r], B [r, out], scale s)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """w · x / sqrt(mean(x²) + ε) over the last axis, normalised in float32.

    Like HF's ``LlamaRMSNorm`` the normalised activations are cast back to ``dtype``
    before the weight multiplies them, so bf16 runs match HF's rounding.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * normed.astype(dtype)


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """s · (x A) B for x [..., in], A [in, r], B [r, out], s a scalar.

    The same function as ``(x @ a @ b) * scale``, with a hand-written backward pass that
    only ever transposes the small operands: left to autodiff, XLA:CPU materialised
    transposed copies of the [tokens, out] output gradient and the [tokens, in] input
    (see BENCHMARKS.md). Here dB = (xA)ᵀ g and dAᵀ = (g Bᵀ)ᵀ x transpose only
    [tokens, r] matrices. ``scale`` gets no gradient (a fixed hyper-parameter).
    """
    return (x @ a @ b) * scale


def _lora_delta_fwd(x, a, b, scale):
    xa = x @ a
    return (xa @ b) * scale, (x, a, b, xa, scale)


def _lora_delta_bwd(res, g):
    x, a, b, xa, scale = res
    in_features, rank = a.shape
    x2 = x.reshape(-1, in_features)
    xa2 = xa.reshape(-1, rank)
    g2 = (g * scale).reshape(-1, b.shape[1])
    g_xa = g2 @ b.T  # [tokens, r]
    # optimization_barrier keeps the small transposes materialised, so XLA does not fold
    # them into the dots and transpose the big operand instead.
    d_b = jax.lax.optimization_barrier(xa2.T) @ g2
    d_a = (jax.lax.optimization_barrier(g_xa.T) @ x2).T
    d_x = (g_xa @ a.T).reshape(x.shape)
    return d_x, d_a.astype(a.dtype), d_b.astype(b.dtype), jnp.zeros_like(scale)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def linear(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    lora: LoRAWeights | None = None,
    *,
    dtype: Any,
) -> jax.Array:
    """x W (+ b) (+ s·x A B) in ``dtype``; ``kernel`` is [in, out] (torch's transpose).

    The adapter term runs in the promoted dtype of x, A and B (float32 adapters on a bf16
    base stay float32) and is cast to ``dtype`` when added.
    """
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    if bias is not None:
        y = y + bias.astype(dtype)
    if lora is not None:
        a, b, scale = lora
        xa, a, b = nnx.nn.dtypes.promote_dtype((x, a, b), dtype=None)
        y = y + lora_delta(xa, a, b, scale.astype(xa.dtype)).astype(dtype)
    return y


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [hd/2] in float32, with the checkpoint's scaling.

    Default: θ^(−2i/hd) (Su et al. 2021). "linear" divides by ``factor``. "llama3"
    (Llama 3.1/3.2) divides low frequencies by ``factor``, keeps high ones and
    interpolates in between, as HF's ``_compute_llama3_parameters``.
    """
    hd = config.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., hd] (float32) of angles positions·inv_freq, halves repeated."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin (HF's half-split layout).

    x is [..., heads, hd] and cos/sin are [..., hd] (``rope_cos_sin`` of x's positions):
    [B, T, heads, hd] with [B, T, hd] in the model, [B, heads, hd] with [B, hd] when
    decoding one token.
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q kᵀ / sqrt(hd) + mask) v with grouped-query heads, softmax in float32.

    Args:
      q: [B, T, H, hd] queries, or [B, H, hd] for one token per row (decoding).
      k, v: [B, K, S, hd] keys and values (H % K == 0; query head h reads KV head h // G).
      mask: [B, T, S] bool, True where query t may attend key slot s ([B, S] with a
        [B, H, hd] q).

    Returns:
      [B, T, H·hd] ([B, H·hd] for a [B, H, hd] q) in q's dtype.
    """
    *lead, h, hd = q.shape
    kv = k.shape[1]
    q = q.reshape(*lead, kv, h // kv, hd)
    # The token axis is left out of the contractions when there is none, rather than
    # added as a unit axis, so the decode step's dots keep their shape.
    t = "t" if len(lead) == 2 else ""
    scores = jnp.einsum(f"b{t}kgd,bksd->bkg{t}s", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkg{t}s,bksd->b{t}kgd", probs, v)
    return out.reshape(*lead, h * hd)
