"""Tiny random Llama-family checkpoints for tests, with the torch ``transformers`` oracle.

``tiny_hf_config(kind)`` returns a ``config.json`` dict (2 layers, hidden 64) for one of
``KINDS``; ``torch_model(config)`` builds the matching transformers model with seeded
random weights, where norms and biases are randomised too (the library leaves them at
1 and 0, which would hide a missing bias or norm weight); ``torch_state_dict`` and
``torch_logits`` read it back as numpy; ``logits`` runs a fedsp model under a cached jit.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("llama", "qwen2", "smollm", "llama3", "mistral")

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_hf_config(kind: str = "llama") -> dict[str, Any]:
    """A small HF config dict of the given family.

    llama: untied Llama with θ = 10⁴; qwen2: q/k/v bias, θ = 10⁶; smollm: tied embeddings,
    θ = 10⁵ (SmolLM2's); llama3: Llama 3.1 "llama3" rope scaling with a short original
    context so positions in tests cross all three frequency bands; mistral: a sliding
    window shorter than test sequences.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
    cfg = dict(_BASE)
    if kind == "llama":
        cfg.update(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False)
    elif kind == "qwen2":
        cfg.update(
            model_type="qwen2", rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False
        )
    elif kind == "smollm":
        cfg.update(
            model_type="llama",
            rope_theta=1e5,
            tie_word_embeddings=True,
            num_attention_heads=8,
            num_key_value_heads=2,
        )
    elif kind == "llama3":
        cfg.update(
            model_type="llama",
            rope_theta=5e5,
            tie_word_embeddings=False,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        )
    elif kind == "mistral":
        cfg.update(
            model_type="mistral",
            rope_theta=1e4,
            tie_word_embeddings=False,
            sliding_window=4,
            head_dim=16,
        )
    return cfg


def torch_model(hf_config: dict[str, Any], seed: int = 0):
    """The transformers model of ``hf_config`` in float32 eval mode, seeded weights."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    # Eager attention keeps the oracle independent of SDPA kernel choices.
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))
    return model.eval()


def torch_state_dict(model) -> dict[str, np.ndarray]:
    """``model.state_dict()`` as numpy (tied models list ``lm_head.weight`` only if saved)."""
    sd = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def torch_logits(
    model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
) -> np.ndarray:
    """Float32 logits [B, T, V]; with a mask, positions are HF's cumsum(mask) − 1."""
    import torch

    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    kwargs = {}
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs = dict(attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float().numpy()


def left_padded_batch(
    vocab_size: int, lengths: list[int], total: int, seed: int = 0, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random ids [B, total] left-padded to ``total`` with pad_id, and the 0/1 mask."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), total), pad_id, np.int32)
    mask = np.zeros((len(lengths), total), np.int32)
    for row, n in enumerate(lengths):
        ids[row, total - n :] = rng.integers(3, vocab_size, size=n)
        mask[row, total - n :] = 1
    return ids, mask


def pack_left(rows: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of any lengths left-padded to the longest: (ids [B, T], 0/1 mask)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def logits(model, input_ids, attention_mask=None) -> np.ndarray:
    """``model(input_ids, attention_mask)`` under one cached jit per graph and shape.

    Calling an NNX model eagerly re-traces its layer scan every time; tests share this
    compiled entry point instead.
    """
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask)
    return np.asarray(_jit_logits(graphdef, state, ids, mask))
