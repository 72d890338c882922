"""Hugging Face torch state dicts in and out of the stacked ``Transformer``.

HF names and layouts (``model.layers.{i}.self_attn.q_proj.weight``, Linear weights as
(out, in)) map onto the stacked [L, ...] parameters; LoRA adapters can be folded into the
exported weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.model.transformer import Transformer, merged_kernel

# HF per-layer suffix -> (path inside a stacked DecoderLayer, is a torch Linear weight).
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), True),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), True),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), True),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), True),
    "self_attn.q_proj.bias": (("self_attn", "q_proj", "bias"), False),
    "self_attn.k_proj.bias": (("self_attn", "k_proj", "bias"), False),
    "self_attn.v_proj.bias": (("self_attn", "v_proj", "bias"), False),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
    "input_layernorm.weight": (("input_layernorm", "weight"), False),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "weight"), False),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _get(module: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _global_tensors(model: Transformer) -> dict[str, tuple[nnx.Param, bool]]:
    out = {
        "model.embed_tokens.weight": (model.embed_tokens.embedding, False),
        "model.norm.weight": (model.norm.weight, False),
    }
    if model.lm_head is not None:
        out["lm_head.weight"] = (model.lm_head.kernel, True)
    return out


def _layer_tensors(model: Transformer) -> dict[str, tuple[nnx.Param, bool]]:
    out = {}
    for suffix, (path, linear) in _LAYER_TENSORS.items():
        var = _get(model.layers, path)
        if var is not None:
            out[suffix] = (var, linear)
    return out


def hf_tensor_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """HF name -> torch shape of every tensor ``load_hf_state_dict`` expects."""
    shapes = {}
    for name, (var, linear) in _global_tensors(model).items():
        shape = tuple(var.shape)
        shapes[name] = shape[::-1] if linear else shape
    for suffix, (var, linear) in _layer_tensors(model).items():
        shape = tuple(var.shape[1:])
        for i in range(model.config.num_hidden_layers):
            shapes[f"model.layers.{i}.{suffix}"] = shape[::-1] if linear else shape
    return shapes


def _assign(var: nnx.Param, value: np.ndarray) -> None:
    old = var.get_value()
    new = jnp.asarray(value, dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    if isinstance(old, jax.Array) and sharding is not None:
        # Keep a placement made by fedsp.model.sharding (FSDP over "model").
        new = jax.device_put(new, sharding)
    var.set_value(new)


def load_hf_state_dict(model: Transformer, tensors: Mapping[str, np.ndarray]) -> None:
    """Fills ``model``'s base weights from a Hugging Face torch-layout state dict.

    Linear weights are (out, in) as in torch and are transposed; per-layer tensors
    ``model.layers.{i}.*`` are stacked on the leading ``layers`` axis. Values are cast to
    the model's parameter dtype; LoRA adapters, if attached, are left untouched. Works on
    a model made with ``nnx.eval_shape`` (abstract values are replaced).

    Raises:
      ValueError: a tensor is missing (named), has the wrong shape (named, with the
        expected and actual shapes), or is not part of the architecture (all listed;
        ``rotary_emb.inv_freq`` buffers are ignored).
    """
    expected = hf_tensor_shapes(model)
    given = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(given), key=_natural_key)
    if missing:
        raise ValueError(f"state dict is missing {len(missing)} tensor(s): {missing}")
    extra = sorted(set(given) - set(expected), key=_natural_key)
    if extra:
        raise ValueError(
            f"state dict has unexpected tensor(s) for {model.config.model_type}: {extra}"
        )
    for name, shape in expected.items():
        actual = tuple(np.shape(given[name]))
        if actual != shape:
            raise ValueError(f"tensor {name!r} has shape {actual}, expected {shape}")

    for name, (var, linear) in _global_tensors(model).items():
        value = np.asarray(given[name])
        _assign(var, value.T if linear else value)
    for suffix, (var, linear) in _layer_tensors(model).items():
        per_layer = []
        for i in range(model.config.num_hidden_layers):
            value = np.asarray(given[f"model.layers.{i}.{suffix}"])
            per_layer.append(value.T if linear else value)
        _assign(var, np.stack(per_layer))


def hf_state_dict(model: Transformer, merge_lora: bool = True) -> dict[str, np.ndarray]:
    """The inverse of ``load_hf_state_dict``: HF names and torch layouts, numpy arrays.

    Args:
      model: the model.
      merge_lora: fold attached LoRA adapters into the base weights (W + s·A B);
        otherwise the base weights alone are returned.

    Tied models emit no ``lm_head.weight``. Arrays keep the parameter dtype.
    """
    out: dict[str, np.ndarray] = {}
    for name, (var, linear) in _global_tensors(model).items():
        value = np.asarray(var.get_value())
        out[name] = value.T if linear else value
    for suffix, (var, linear) in _layer_tensors(model).items():
        value = np.asarray(var.get_value())
        if merge_lora and linear:
            owner = _get(model.layers, _LAYER_TENSORS[suffix][0][:-1])
            if owner.lora is not None:
                value = np.asarray(merged_kernel(owner))
        for i in range(model.config.num_hidden_layers):
            layer = value[i].T if linear else value[i]
            out[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(layer)
    return out


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
