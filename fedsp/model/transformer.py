"""Flax NNX decoder-only LM for the Llama family (Llama 2/3, Qwen2/2.5, SmolLM2, Mistral).

Each layer is pre-norm: ``x += Attn(RMSNorm(x))``, ``x += SwiGLU(RMSNorm(x))`` with
grouped-query attention and rotary position embeddings in Hugging Face's ``rotate_half``
layout, so HF checkpoints load without permuting q/k rows.

Layers are stacked: every per-layer parameter carries a leading ``layers`` axis of size L
and the forward pass runs one ``jax.lax.scan`` over it, so XLA compiles the layer body
once (BENCHMARKS.md, "Model", has the compile-time and decode-step trade-off). HF
tensors are read and written per layer (``fedsp.model.hf_weights``).

The arithmetic (RMS norm, RoPE, attention, projections) is ``fedsp.model.layers``'s pure
functions, which the sampler's decode step calls too.

Every parameter has logical axis names (``out_sharding`` metadata, e.g.
``("layers", "embed", "mlp")``); ``fedsp.model.sharding`` maps them onto a
``("clients", "model")`` mesh. Variables are created with ``eager_sharding=False`` so a
model can be built without a mesh (the CPU default) and placed afterwards.

Shapes: B batch, T tokens, S key slots, D hidden, H query heads, K key/value heads,
G = H // K query heads per KV head, hd head dim, F MLP width, V vocab, L layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fedsp.model.config import ModelConfig
from fedsp.model.layers import apply_rope, attend, linear, rms_norm, rope_cos_sin, rope_inv_freq

if TYPE_CHECKING:  # fedsp.model.lora imports this module
    from fedsp.model.lora import LoRA, LoRAConfig

_INIT = nnx.initializers.normal(0.02)  # HF's initializer_range for the Llama family.

# Rematerialisation of the scanned layer body in the backward pass (``Transformer.remat``):
# "none" keeps every activation the backward pass reads; "full" keeps only each layer's
# input and recomputes the whole layer; "dots" keeps the outputs of the matmuls without
# batch dimensions (the q/k/v/o, gate/up/down and LoRA projections, O(T·D) and O(T·F)
# per row) and recomputes the rest, the attention scores and probabilities included:
# those are the dots with batch dimensions (batch, KV head) and, at O(T²) per head, the
# largest activations of long sequences, which `checkpoint_dots` would keep.
REMAT_POLICIES = ("none", "full", "dots")
_REMAT_POLICY = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class KVCache(NamedTuple):
    """Keys and values of every layer, ``k``/``v``: [L, B, K, S, hd].

    Slot s of a row holds the key/value of that row's s-th input token; the sampler keeps
    a [B, S] mask of which slots hold real (non-pad) tokens.
    """

    k: jax.Array
    v: jax.Array


def init_cache(
    config: ModelConfig, batch_size: int, max_length: int, dtype: Any = jnp.float32
) -> KVCache:
    """An all-zero cache of ``max_length`` slots for ``batch_size`` rows."""
    shape = (
        config.num_hidden_layers,
        batch_size,
        config.num_key_value_heads,
        max_length,
        config.head_dim,
    )
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class RMSNorm(nnx.Module):
    """y = w · x / sqrt(mean(x²) + ε) (Zhang & Sennrich 2019; ``layers.rms_norm``)."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, param_dtype: Any):
        self.weight = _param(jnp.ones((dim,), param_dtype), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, self.dtype)


class Linear(nnx.Module):
    """y = x W (+ b) (+ LoRA(x)); ``kernel`` is [in, out] (the transpose of torch's).

    ``lora`` is None until ``fedsp.model.lora.apply_lora`` attaches an adapter, so the
    base parameters keep the same path with and without LoRA.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str, str],
        use_bias: bool,
        rngs: nnx.Rngs,
        dtype: Any,
        param_dtype: Any,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.axes = axes
        self.kernel = _param(_INIT(rngs.params(), (in_features, out_features), param_dtype), axes)
        self.bias = _param(jnp.zeros((out_features,), param_dtype), axes[1:]) if use_bias else None
        self.lora: LoRA | None = nnx.data(None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return linear(x, self.kernel[...], bias, lora_weights(self), dtype=self.dtype)


def lora_weights(linear: Linear) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """(A, B, scale) of ``linear``'s adapter as arrays, or None without one."""
    lora = linear.lora
    if lora is None:
        return None
    return lora.lora_a[...], lora.lora_b[...], lora.scale[...]


def merged_kernel(linear: Linear) -> jax.Array:
    """W + s_l · A_l B_l for every layer l of a stacked, LoRA-carrying Linear [L, in, out].

    The sum is formed in float32 and cast back to the kernel's dtype.
    """
    lora = linear.lora
    if lora is None:
        raise ValueError("merged_kernel needs a Linear with a LoRA adapter attached")
    kernel = linear.kernel[...]
    delta = jnp.einsum(
        "lir,lro->lio", lora.lora_a[...].astype(jnp.float32), lora.lora_b[...].astype(jnp.float32)
    )
    delta = delta * lora.scale[...].astype(jnp.float32)[:, None, None]
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE and an optional stacked KV cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        d, hd = config.hidden_size, config.head_dim
        h, kv = config.num_attention_heads, config.num_key_value_heads
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        bias = config.attention_bias
        self.q_proj = Linear(d, h * hd, axes=("embed", "q_heads"), use_bias=bias, **common)
        self.k_proj = Linear(d, kv * hd, axes=("embed", "kv_heads"), use_bias=bias, **common)
        self.v_proj = Linear(d, kv * hd, axes=("embed", "kv_heads"), use_bias=bias, **common)
        self.o_proj = Linear(h * hd, d, axes=("q_heads", "embed"), use_bias=False, **common)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: KVCache | None,
        cache_index: jax.Array | None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Attention of T new tokens; with ``cache``, over this layer's [B, K, S, hd] slots.

        Returns the output and, with a cache, the new tokens' keys/values [B, K, T, hd]
        (the caller writes them into the stacked cache once, after the layer scan).
        """
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, hd]
        new = None
        if cache is not None:
            if cache_index is None:
                raise ValueError("cache_index is required with a cache")
            new = KVCache(k.astype(cache.k.dtype), v.astype(cache.v.dtype))
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(cache.k, new.k, start)
            v = jax.lax.dynamic_update_slice(cache.v, new.v, start)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out), new


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        d, f = config.hidden_size, config.intermediate_size
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **common)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **common)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        common = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, **common)
        self.self_attn = Attention(config, rngs=rngs, **common)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, **common
        )
        self.mlp = MLP(config, rngs=rngs, **common)

    def __call__(self, x, cos, sin, mask, cache, cache_index):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, cache


class Embed(nnx.Module):
    """Token embedding table [V, D] (``embedding``)."""

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, param_dtype: Any):
        self.embedding = _param(
            _INIT(rngs.params(), (num_embeddings, features), param_dtype), ("vocab", "embed")
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class Transformer(nnx.Module):
    """Llama-family causal LM: ``model(input_ids[B,T]) -> logits[B,T,V]`` (float32).

    Args:
      config: the architecture.
      rngs: initialisation randomness (weights ~ N(0, 0.02²), norms 1, biases 0).
      param_dtype: storage dtype of the weights (float32 or bfloat16).
      dtype: compute dtype of activations and matmuls; None means ``param_dtype``.
        RMSNorm statistics, attention softmax and the LM head's output are float32
        regardless.
      remat: what the backward pass recomputes per layer instead of keeping, one of
        `REMAT_POLICIES` ("none", "full", "dots"): memory for compute, same gradients.
        An attribute the graph carries: set it before ``nnx.split`` to change a built
        model.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        remat: str = "none",
    ):
        dtype = param_dtype if dtype is None else dtype
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat_policy_name(remat)
        self.lora_config: LoRAConfig | None = None  # set by fedsp.model.lora.apply_lora
        self.embed_tokens = Embed(
            config.vocab_size, config.hidden_size, rngs=rngs, param_dtype=param_dtype
        )

        @nnx.split_rngs(splits=config.num_hidden_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        if config.tie_word_embeddings:
            self.lm_head: Linear | None = None
        else:
            self.lm_head = Linear(
                config.hidden_size,
                config.vocab_size,
                axes=("embed", "vocab"),
                use_bias=False,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, V] in float32 of a (left- or right-)padded batch.

        Args:
          input_ids: [B, T] int token ids.
          attention_mask: [B, T] 1 for real tokens, 0 for padding; None means all real.
          positions: [B, T] RoPE positions; None means ``cumsum(attention_mask) − 1``
            (HF's convention, so a left-padded row gets the positions it has unpadded).

        Padded positions produce finite logits that carry no meaning; mask them out.
        """
        return self.logits(self.hidden_states(input_ids, attention_mask, positions))

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Final-normed hidden states [B, T, D] in the compute dtype (see ``__call__``)."""
        input_ids = _check_ids(input_ids)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.bool_)
        elif attention_mask.shape != (b, t):
            raise ValueError(
                f"attention_mask must have shape {(b, t)} like input_ids, got "
                f"{attention_mask.shape}"
            )
        attention_mask = attention_mask.astype(jnp.bool_)
        if positions is None:
            positions = default_positions(attention_mask)
        elif positions.shape != (b, t):
            raise ValueError(f"positions must have shape {(b, t)}, got {positions.shape}")
        idx = jnp.arange(t)
        mask = (idx[None, :, None] >= idx[None, None, :]) & attention_mask[:, None, :]
        mask = self._window(mask, idx[:, None], idx[None, :])
        x, _ = self._layers(input_ids, positions, mask, None, None)
        return x

    def forward_with_cache(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        kv_mask: jax.Array,
        cache: KVCache,
        cache_index: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Runs T new tokens against a KV cache (prefill when T > 1, decode when T = 1).

        Args:
          input_ids: [B, T] tokens written to cache slots cache_index … cache_index+T−1.
          positions: [B, T] their RoPE positions.
          kv_mask: [B, S] True for slots holding real tokens, including the new ones.
          cache: the [L, B, K, S, hd] cache.
          cache_index: int32 scalar, the first slot written.

        Returns:
          (hidden [B, T, D] final-normed, updated cache). Apply ``logits`` to the rows
          you need: projecting a whole prefill onto the vocabulary is the costliest op.
        """
        input_ids = _check_ids(input_ids)
        t, s = input_ids.shape[1], cache.k.shape[3]
        q_slot = cache_index + jnp.arange(t)[:, None]
        k_slot = jnp.arange(s)[None, :]
        mask = (k_slot <= q_slot)[None] & kv_mask.astype(jnp.bool_)[:, None, :]
        mask = self._window(mask, q_slot, k_slot)
        return self._layers(input_ids, positions, mask, cache, cache_index)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Projects hidden states [..., D] onto the vocabulary: [..., V] float32."""
        if self.lm_head is None:
            w = self.embed_tokens.embedding[...]  # [V, D]
            return jnp.einsum(
                "...d,vd->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32
            )
        w = self.lm_head.kernel[...]  # [D, V]
        return jnp.einsum(
            "...d,dv->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32
        )

    def _window(self, mask: jax.Array, q_slot: jax.Array, k_slot: jax.Array) -> jax.Array:
        window = self.config.sliding_window
        if window is None:
            return mask
        return mask & (k_slot > q_slot - window)

    def _layers(self, input_ids, positions, mask, cache, cache_index):
        x = self.embed_tokens(input_ids).astype(self.dtype)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config))
        graphdef, state = nnx.split(self.layers)

        # The cache is scanned as xs (one layer's slots per step) and the new tokens' keys
        # and values come out as ys, written into the stacked cache by one update after
        # the scan. Carrying the whole [L, ...] cache through the scan and updating it per
        # layer made XLA:CPU copy the full cache on every layer of every decode step.
        def body(x, xs):
            layer_state, layer_cache = xs
            layer = nnx.merge(graphdef, layer_state)
            return layer(x, cos, sin, mask, layer_cache, cache_index)

        if remat_policy_name(self.remat) != "none":
            body = jax.checkpoint(body, prevent_cse=False, policy=_REMAT_POLICY[self.remat])
        x, new = jax.lax.scan(body, x, (state, cache))
        if cache is not None:
            start = (0, 0, 0, cache_index, 0)
            cache = KVCache(
                jax.lax.dynamic_update_slice(cache.k, new.k, start),
                jax.lax.dynamic_update_slice(cache.v, new.v, start),
            )
        return self.norm(x), cache


def remat_policy_name(remat: str) -> str:
    """``remat`` if it is one of `REMAT_POLICIES`, else ValueError naming them."""
    if not isinstance(remat, str) or remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    return remat


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) − 1 clipped at 0: [B, T] int32 positions of a padded batch."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _check_ids(input_ids: jax.Array) -> jax.Array:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
    return input_ids
