"""One decode step over per-layer weights, for the sampler's unrolled layer loop.

Inside a ``lax.scan`` over the stacked [L, ...] weights XLA:CPU copies every layer's
slice before its matmuls, on every decode step (BENCHMARKS.md, "Model"). The sampler
therefore slices the weights once per ``generate`` call (``layer_weights``) and unrolls
the layers in its decode body (``decode_step``), which runs the same
``fedsp.model.layers`` functions as ``Transformer.forward_with_cache`` for one token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedsp.model.layers import apply_rope, attend, linear, rms_norm, rope_cos_sin, rope_inv_freq
from fedsp.model.transformer import lora_weights, merged_kernel

PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)

LayerCache = tuple[jax.Array, jax.Array]  # one layer's (k, v), each [B, K, S, hd]


def layer_weights(model: Any, merge_lora: bool) -> list[dict[str, Any]]:
    """Every layer's weights as separate arrays: {"ln1", "ln2", projection name: args}.

    A projection's entry is ``(kernel, bias, lora)`` for ``layers.linear``. With
    ``merge_lora`` the adapters are folded into the kernels here, once (W + s·A B), so a
    step runs 7 matmuls per layer instead of 21; equal up to float rounding.
    """
    layers = model.layers
    merged = {}
    for parent, name in PROJECTIONS:
        lin = getattr(getattr(layers, parent), name)
        if merge_lora and lin.lora is not None:
            merged[name] = merged_kernel(lin)  # [L, in, out]
    out = []
    for i in range(model.config.num_hidden_layers):
        w: dict[str, Any] = {
            "ln1": layers.input_layernorm.weight[...][i],
            "ln2": layers.post_attention_layernorm.weight[...][i],
        }
        for parent, name in PROJECTIONS:
            lin = getattr(getattr(layers, parent), name)
            kernel = merged[name][i] if name in merged else lin.kernel[...][i]
            lora = None
            if name not in merged and (adapter := lora_weights(lin)) is not None:
                a, b, scale = adapter
                lora = (a[i], b[i], scale[i])
            bias = None if lin.bias is None else lin.bias[...][i]
            w[name] = (kernel, bias, lora)
        out.append(w)
    return out


def decode_step(
    model: Any,
    weights: list[dict[str, Any]],
    caches: list[LayerCache],
    tok: jax.Array,
    pos: jax.Array,
    kv_mask: jax.Array,
    slot: jax.Array,
) -> tuple[jax.Array, list[LayerCache]]:
    """One token per row through every layer: (hidden [B, D] final-normed, new caches).

    ``tok``/``pos`` are [B]; ``kv_mask`` [B, S] marks the real slots, the new one
    included; the new token's key/value is written at ``slot`` of each layer's cache.
    ``Transformer.forward_with_cache`` with T = 1 computes the same function (the sampler
    tests check the two agree through greedy decoding).
    """
    config, dtype = model.config, model.dtype
    b = tok.shape[0]
    h, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps
    cos, sin = rope_cos_sin(pos, rope_inv_freq(config))  # [B, hd]
    mask = kv_mask.astype(jnp.bool_)
    if config.sliding_window is not None:
        mask = mask & (jnp.arange(kv_mask.shape[1])[None, :] > slot - config.sliding_window)
    x = model.embed_tokens(tok).astype(dtype)
    new_caches = []
    for w, (k_cache, v_cache) in zip(weights, caches):
        y = rms_norm(x, w["ln1"], eps, dtype)
        q = apply_rope(linear(y, *w["q_proj"], dtype=dtype).reshape(b, h, hd), cos, sin)
        k = apply_rope(linear(y, *w["k_proj"], dtype=dtype).reshape(b, kv, hd), cos, sin)
        v = linear(y, *w["v_proj"], dtype=dtype).reshape(b, kv, hd)
        k_cache = jax.lax.dynamic_update_slice(
            k_cache, k[:, :, None].astype(k_cache.dtype), (0, 0, slot, 0)
        )
        v_cache = jax.lax.dynamic_update_slice(
            v_cache, v[:, :, None].astype(v_cache.dtype), (0, 0, slot, 0)
        )
        new_caches.append((k_cache, v_cache))
        attn = attend(q, k_cache.astype(dtype), v_cache.astype(dtype), mask)
        x = x + linear(attn, *w["o_proj"], dtype=dtype)
        y = rms_norm(x, w["ln2"], eps, dtype)
        gate = linear(y, *w["gate_proj"], dtype=dtype)
        up = linear(y, *w["up_proj"], dtype=dtype)
        x = x + linear(jax.nn.silu(gate) * up, *w["down_proj"], dtype=dtype)
    return model.norm(x), new_caches
