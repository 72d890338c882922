"""GGUF checkpoints as Hugging Face-named float32 tensors and an HF ``config.json`` dict.

GGUF (llama.cpp's format) stores a decoder's weights under its own names
(``blk.{i}.attn_q.weight``), often block-quantized (Q4_1, Q8_0, Q4_K, ...), with the
architecture and tokenizer as key/value metadata. :func:`load_gguf` reads one with the
``gguf`` package, dequantizes every tensor to float32 (``gguf.quants.dequantize``), renames it
to the Hugging Face torch name and layout (a Linear weight is ``(out, in)``; GGUF's
``ne = [in, out]`` already reads as ``(out, in)`` in numpy's row-major order), and builds the
HF config from the metadata, so the rest of fedsp sees one checkpoint format.

Rotary layout. Hugging Face Llama rotates the two *halves* of each head
(``rotate_half``); llama.cpp rotates adjacent *pairs*. Its converter
(``convert_hf_to_gguf.py``, ``LlamaModel.permute``) therefore reorders the rows of
``attn_q``/``attn_k`` inside each head: HF row ``h·d + j`` (``j < d/2``, half ``0``) and
``h·d + d/2 + j`` (half ``1``) move to ``h·d + 2j`` and ``h·d + 2j + 1``. :func:`unpermute_rotary`
undoes it, as transformers' ``LlamaTensorProcessor`` does; Qwen2 is converted without the
permutation (llama.cpp runs it in NEOX, i.e. half-split, mode).

:func:`save_gguf` writes the inverse (F32, F16 or Q8_0) so a fine-tuned model can be run by
llama.cpp or Ollama, and tests can build small GGUF files that transformers reads as an
independent oracle.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import gguf
import numpy as np

from fedsp.model.config import ModelConfig
from fedsp.model.gguf_reader import dequantize, read_header

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GGUFCheckpoint",
    "hf_config_from_gguf",
    "load_gguf",
    "permute_rotary",
    "read_gguf_metadata",
    "save_gguf",
    "unpermute_rotary",
]

# GGUF architecture -> (HF architectures entry, HF model_type, q/k rows permuted by the converter).
_ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
# llama.cpp converts Mistral checkpoints as "llama" (same layout, permuted q/k).
_HF_TO_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
_HF_BLOCK_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_TO_GGUF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_HF_TO_GGUF_BLOCK = {v: k for k, v in _BLOCK_NAMES.items()}
# Llama 3.1/3.2 rope scaling: llama.cpp stores only the per-frequency factors
# (``rope_freqs.weight``), computed with these fixed constants (convert_hf_to_gguf.py).
_LLAMA3_ROPE_CONSTANTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_TENSOR_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
}


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file read into Hugging Face terms.

    Attributes:
      path: the file.
      architecture: GGUF ``general.architecture`` (one of :data:`SUPPORTED_ARCHITECTURES`).
      metadata: every GGUF key/value pair, decoded to Python values (strings, numbers,
        lists); the ``tokenizer.*`` keys describe the tokenizer.
      hf_config: a ``config.json`` dict for the model (``ModelConfig.from_hf`` reads it).
      tensors: HF name -> float32 array in the HF torch layout (Linear weights ``(out, in)``).
    """

    path: pathlib.Path
    architecture: str
    metadata: dict[str, Any]
    hf_config: dict[str, Any]
    tensors: dict[str, np.ndarray]


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's per-head row interleaving of a q/k projection.

    Args:
      weight: ``[num_heads·head_dim, ...]`` rows as llama.cpp stores them (a weight
        ``(out, in)`` or a bias ``(out,)``); ``num_heads`` is the KV head count for ``k``.
      num_heads: heads the rows split into.

    Returns:
      The same rows in Hugging Face order: for each head, rows ``(2j, 2j+1)`` become
      ``(j, j + head_dim/2)``.
    """
    head_dim = _rotary_head_dim(weight, num_heads)
    rows = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The converter's permutation (inverse of :func:`unpermute_rotary`)."""
    head_dim = _rotary_head_dim(weight, num_heads)
    rows = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _rotary_head_dim(weight: np.ndarray, num_heads: int) -> int:
    if num_heads <= 0 or weight.shape[0] % num_heads or (weight.shape[0] // num_heads) % 2:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, expected a multiple of 2·num_heads "
            f"(num_heads={num_heads})."
        )
    return weight.shape[0] // num_heads


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, decoded (no tensor is read)."""
    _, _, metadata = read_header(pathlib.Path(path))
    return metadata


def load_gguf(path: str | os.PathLike[str]) -> GGUFCheckpoint:
    """Reads a llama/qwen2 GGUF file into HF-named float32 tensors and an HF config.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is truncated or not a GGUF file, its architecture or a tensor's
        quantization type is unsupported, it holds an unexpected tensor, or its rope
        scaling cannot be recovered. The message names the file.
    """
    path = pathlib.Path(path)
    blob, tensor_table, metadata = read_header(path)
    shapes = {t.name: t.shape for t in tensor_table}
    by_name = {t.name: t for t in tensor_table}
    rope_freqs = (
        dequantize(path, blob, by_name["rope_freqs.weight"])
        if "rope_freqs.weight" in by_name
        else None
    )
    hf_config = hf_config_from_gguf(metadata, shapes, rope_freqs=rope_freqs, source=str(path))
    architecture = metadata["general.architecture"]
    permuted = _ARCHITECTURES[architecture][2]

    tensors: dict[str, np.ndarray] = {}
    unexpected = []
    for tensor in tensor_table:
        if tensor.name == "rope_freqs.weight":
            continue  # folded into hf_config["rope_scaling"]
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            unexpected.append(tensor.name)
            continue
        array = dequantize(path, blob, tensor)
        if permuted and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            heads = (
                hf_config["num_attention_heads"]
                if ".attn_q." in tensor.name
                else hf_config["num_key_value_heads"]
            )
            array = unpermute_rotary(array, heads)
        tensors[hf_name] = array
    if unexpected:
        raise ValueError(
            f"{path}: unexpected tensors for architecture {architecture!r}: {sorted(unexpected)}"
        )
    return GGUFCheckpoint(path, architecture, metadata, hf_config, tensors)


def hf_config_from_gguf(
    metadata: Mapping[str, Any],
    tensor_shapes: Mapping[str, tuple[int, ...]],
    *,
    rope_freqs: np.ndarray | None = None,
    source: str = "<gguf>",
) -> dict[str, Any]:
    """The HF ``config.json`` dict a GGUF file's metadata describes.

    Args:
      metadata: decoded GGUF key/values (``general.architecture``, ``{arch}.block_count``, ...).
      tensor_shapes: GGUF tensor name -> numpy shape; the vocabulary size is the embedding's
        row count, the model is tied when there is no ``output.weight``, and Qwen-style
        ``attention_bias`` is read off ``blk.0.attn_q.bias``.
      rope_freqs: the ``rope_freqs.weight`` tensor, if any (Llama 3.1/3.2 rope scaling).
      source: the file's name, for error messages.

    Raises:
      ValueError: unsupported architecture, a required key missing, or rope factors that do
        not match Llama 3 scaling with llama.cpp's constants.
    """
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{source}: unsupported GGUF architecture {arch!r}; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}."
        )
    hf_arch, model_type, _ = _ARCHITECTURES[arch]

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in metadata:
            return metadata[full]
        if default is ...:
            raise ValueError(f"{source}: GGUF metadata has no {full!r}.")
        return default

    if "token_embd.weight" not in tensor_shapes:
        raise ValueError(f"{source}: GGUF file has no tensor 'token_embd.weight'.")
    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", key("rope.dimension_count", hidden // heads)))
    theta = float(key("rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(tensor_shapes["token_embd.weight"][0]),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rope_theta": theta,
        # float32 in the file: 1e-5 reads back as 9.99999974e-06; round to what HF configs say.
        "rms_norm_eps": float(
            np.format_float_positional(
                np.float32(key("attention.layer_norm_rms_epsilon")), unique=True
            )
        ),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "rope_scaling": _rope_scaling(metadata, arch, rope_freqs, theta, head_dim, source),
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    for name in ("bos", "eos", "pad"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    return config


def _rope_scaling(
    metadata: Mapping[str, Any],
    arch: str,
    rope_freqs: np.ndarray | None,
    theta: float,
    head_dim: int,
    source: str,
) -> dict[str, Any] | None:
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(
            f"{source}: unsupported rope scaling type {scaling_type!r}; "
            "supported: none, linear, llama3."
        )
    if scaling_type == "linear":
        if rope_freqs is not None:
            raise ValueError(f"{source}: both linear rope scaling and rope_freqs.weight are set.")
        return {"rope_type": "linear", "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
    if rope_freqs is None:
        return None
    factors = np.asarray(rope_freqs, np.float64).reshape(-1)
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    expected = _llama3_rope_factors(inv_freq, factor, **_LLAMA3_ROPE_CONSTANTS)
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise ValueError(
            f"{source}: rope_freqs.weight does not match Llama 3 rope scaling with factor {factor} "
            f"and {_LLAMA3_ROPE_CONSTANTS}; other rope scalings are not supported."
        )
    return {"rope_type": "llama3", "factor": factor, **_LLAMA3_ROPE_CONSTANTS}


def _llama3_rope_factors(
    inv_freq: np.ndarray,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: float,
) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 rope scaling (Meta's ``apply_scaling``)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    medium = 1.0 / ((1 - smooth) / factor + smooth)
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    return np.where(
        wavelen < high_freq_wavelen, 1.0, np.where(wavelen > low_freq_wavelen, factor, medium)
    )


def save_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    metadata: Mapping[str, Any] | None = None,
    tensor_type: str = "F32",
) -> pathlib.Path:
    """Writes HF-named tensors as a llama.cpp-compatible GGUF file.

    Args:
      path: the ``.gguf`` file to write.
      config: the model's architecture (model_type llama, mistral or qwen2).
      tensors: HF name -> array in the HF torch layout, as ``hf_state_dict`` returns.
      metadata: extra key/values, typically a tokenizer's ``tokenizer.*`` keys
        (``Tokenizer.gguf_metadata()``); str, bool, int, float or lists of str/int/float.
      tensor_type: "F32", "F16" or "Q8_0" for 2-D weights (Q8_0 only where rows are a
        multiple of 32 wide); norms and biases stay F32, as llama.cpp's converter keeps them.

    Mistral is written as llama.cpp's "llama" architecture, which has no sliding window:
    ``config.sliding_window`` is not stored (it only matters beyond that many tokens).

    Returns:
      ``path`` as a ``pathlib.Path``.
    """
    if tensor_type not in _TENSOR_TYPES:
        raise ValueError(f"tensor_type={tensor_type!r}; expected one of {sorted(_TENSOR_TYPES)}.")
    arch = _HF_TO_GGUF_ARCH[config.model_type]
    heads, kv_heads, head_dim = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    rope_scaling = config.rope_scaling or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))

    path = pathlib.Path(path)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_uint32(f"{arch}.block_count", config.num_hidden_layers)
    writer.add_uint32(f"{arch}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{arch}.embedding_length", config.hidden_size)
    writer.add_uint32(f"{arch}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{arch}.attention.head_count", heads)
    writer.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    writer.add_uint32(f"{arch}.attention.key_length", head_dim)
    writer.add_uint32(f"{arch}.attention.value_length", head_dim)
    writer.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_uint32(f"{arch}.vocab_size", config.vocab_size)
    if rope_type == "linear":
        writer.add_string(f"{arch}.rope.scaling.type", "linear")
        writer.add_float32(f"{arch}.rope.scaling.factor", float(rope_scaling["factor"]))
    elif rope_type == "llama3":
        params = {k: rope_scaling[k] for k in _LLAMA3_ROPE_CONSTANTS}
        if params != _LLAMA3_ROPE_CONSTANTS:
            raise ValueError(
                f"config.rope_scaling: llama.cpp assumes {_LLAMA3_ROPE_CONSTANTS}, got {params}."
            )
        inv_freq = 1.0 / config.rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
        factors = _llama3_rope_factors(inv_freq, float(rope_scaling["factor"]), **params)
        writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    elif rope_type != "default":
        raise ValueError(f"config.rope_scaling type {rope_type!r} cannot be written to GGUF.")
    metadata = dict(metadata or {})
    # Without tokenizer metadata, still record the special ids the config knows.
    if config.bos_token_id is not None:
        metadata.setdefault("tokenizer.ggml.bos_token_id", int(config.bos_token_id))
    if config.eos_token_ids:
        metadata.setdefault("tokenizer.ggml.eos_token_id", int(config.eos_token_ids[0]))
    for key_name, value in metadata.items():
        _add_metadata(writer, key_name, value)

    qtype = _TENSOR_TYPES[tensor_type]
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    for name, array in tensors.items():
        gguf_name = _gguf_name(name)
        if gguf_name is None:
            raise ValueError(f"tensors: no GGUF name for {name!r}.")
        array = np.asarray(array, dtype=np.float32)
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            array = permute_rotary(array, heads if ".attn_q." in gguf_name else kv_heads)
        if (
            array.ndim == 2
            and qtype != gguf.GGMLQuantizationType.F32
            and array.shape[1] % block_size == 0
        ):
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_metadata(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    # bool before int: True is an int too.
    scalar_types = (
        (bool, gguf.GGUFValueType.BOOL),
        (int, gguf.GGUFValueType.INT32),
        (float, gguf.GGUFValueType.FLOAT32),
        (str, gguf.GGUFValueType.STRING),
    )
    if isinstance(value, (list, tuple)):
        if not value:
            return
        for py_type, value_type in scalar_types:
            if all(isinstance(v, py_type) for v in value):
                writer.add_key_value(
                    key, list(value), gguf.GGUFValueType.ARRAY, sub_type=value_type
                )
                return
    else:
        for py_type, value_type in scalar_types:
            if isinstance(value, py_type):
                # Token ids are unsigned in llama.cpp's files.
                if py_type is int and key.endswith("_token_id"):
                    value_type = gguf.GGUFValueType.UINT32
                writer.add_key_value(key, value, value_type)
                return
    raise ValueError(
        f"metadata[{key!r}]: unsupported value {value!r}; expected str, bool, int, float or a list."
    )


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    return None


def _gguf_name(hf_name: str) -> str | None:
    if hf_name in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf_name]
    match = _HF_BLOCK_RE.fullmatch(hf_name)
    if match and match.group(2) in _HF_TO_GGUF_BLOCK:
        return f"blk.{match.group(1)}.{_HF_TO_GGUF_BLOCK[match.group(2)]}"
    return None
