"""Loading checkpoints into fedsp models and exporting them back to Hugging Face format.

:func:`from_pretrained` accepts the two formats users have:

* a Hugging Face directory: ``config.json``, ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``, and the tokenizer files (read with ``AutoTokenizer``);
* a ``.gguf`` file (llama.cpp), dequantized to float32 by :mod:`fedsp.model.gguf`, with
  the tokenizer and chat template rebuilt from its metadata.

The model is built abstractly (``nnx.eval_shape``: no random initialisation, no memory for
it) and its parameters are then filled from the checkpoint, cast to ``dtype``.

:func:`save_pretrained` writes a directory torch ``transformers`` loads: ``config.json``,
``generation_config.json`` (every EOS id, so ``generate`` stops where fedsp's sampler does),
``model.safetensors`` (sharded when asked) with LoRA merged into the base weights, and the
tokenizer files; or, with ``adapter_only=True``, a PEFT adapter (``adapter_model.safetensors``
+ ``adapter_config.json``) that :func:`load_adapter` and ``peft`` read.

Every error names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from fedsp.model import lora as lora_lib
from fedsp.model.config import ModelConfig
from fedsp.model.gguf import load_gguf
from fedsp.model.hf_weights import hf_state_dict, load_hf_state_dict
from fedsp.model.tokenizer import Tokenizer
from fedsp.model.transformer import Transformer

__all__ = [
    "from_pretrained",
    "load_adapter",
    "read_hf_config",
    "read_safetensors",
    "save_pretrained",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_CONFIG = "adapter_config.json"


def from_pretrained(
    path: str | os.PathLike[str], dtype: Any = jnp.float32, *, rngs: nnx.Rngs | None = None
) -> tuple[Transformer, Tokenizer | None]:
    """Loads a model and its tokenizer from a Hugging Face directory or a ``.gguf`` file.

    Args:
      path: an HF directory (``config.json`` + safetensors + tokenizer files) or a
        ``.gguf`` file.
      dtype: parameter dtype: ``jnp.float32``/``"float32"``, ``jnp.bfloat16``/``"bfloat16"``
        or ``jnp.float16``/``"float16"``. Checkpoint tensors are cast to it; logits are
        float32 regardless.
      rngs: passed to ``Transformer`` (default ``nnx.Rngs(0)``); it only shapes the abstract
        model, since every parameter then comes from the checkpoint.

    Returns:
      ``(model, tokenizer)``; ``tokenizer`` is None when the checkpoint has none (an HF
      directory without ``tokenizer.json``, a GGUF without ``tokenizer.*`` metadata).

    Raises:
      FileNotFoundError: ``path``, ``config.json``, the weights or a listed shard is missing.
      ValueError: bad ``dtype``; invalid or unsupported ``config.json``; a truncated or
        corrupt safetensors/GGUF file; a tensor missing, extra or of the wrong shape.
    """
    param_dtype = _param_dtype(dtype)
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Model path not found: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: expected a Hugging Face directory or a .gguf file.")
        checkpoint = load_gguf(path)
        config = _config_from_hf(checkpoint.hf_config, path)
        tensors = checkpoint.tensors
        has_tokenizer = "tokenizer.ggml.tokens" in checkpoint.metadata
        tokenizer = Tokenizer.from_gguf(checkpoint.metadata) if has_tokenizer else None
    else:
        config = _config_from_hf(read_hf_config(path), path / "config.json")
        tensors = read_safetensors(path)
        tokenizer = Tokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    # Abstract construction: no random initialisation and no memory for weights that the
    # checkpoint replaces right after.
    model = nnx.eval_shape(
        lambda r: Transformer(config, rngs=r, param_dtype=param_dtype),
        rngs if rngs is not None else nnx.Rngs(0),
    )
    try:
        load_hf_state_dict(model, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return model, tokenizer


def read_hf_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """``directory/config.json`` as a dict.

    Raises:
      FileNotFoundError: no ``config.json``.
      ValueError: it is not valid JSON or not a JSON object.
    """
    file = pathlib.Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: missing; a Hugging Face model directory needs config.json."
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e}).") from e
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}.")
    return config


def read_safetensors(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory's weights, as numpy arrays in their stored dtype.

    Reads ``model.safetensors.index.json`` and all shards it lists when present, else
    ``model.safetensors``.

    Raises:
      FileNotFoundError: no weights file, or a shard the index lists is missing.
      ValueError: a file is truncated or corrupt, the index is invalid, or a tensor the
        index assigns to a shard is not in it.
    """
    directory = pathlib.Path(directory)
    index_file = directory / _INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f"{index_file}: invalid safetensors index ({type(e).__name__}: {e})."
            ) from e
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not (directory / shard).is_file():
                raise FileNotFoundError(
                    f"{directory / shard}: missing; it is listed as a shard in {index_file}."
                )
    elif (directory / _WEIGHTS).is_file():
        weight_map, shards = None, [_WEIGHTS]
    else:
        raise FileNotFoundError(
            f"{directory}: no {_WEIGHTS} or {_INDEX} (only safetensors weights are read)."
        )
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(_read_safetensors_file(directory / shard))
    if weight_map is not None:
        absent = sorted(k for k in weight_map if k not in tensors)
        if absent:
            raise ValueError(
                f"{index_file}: tensors listed but not found in their shards: {absent[:10]}"
            )
    return tensors


def _read_safetensors_file(file: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        with safetensors.safe_open(str(file), framework="np") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except safetensors.SafetensorError as e:
        raise ValueError(
            f"{file}: cannot read safetensors ({e}); the file ({file.stat().st_size} bytes) "
            "is truncated or corrupt."
        ) from e
    except TypeError as e:  # a dtype numpy cannot hold (e.g. float8)
        raise ValueError(f"{file}: unsupported tensor dtype ({e}).") from e


def save_pretrained(
    model: Transformer,
    directory: str | os.PathLike[str],
    *,
    tokenizer: Tokenizer | None = None,
    merge_lora: bool = True,
    adapter_only: bool = False,
    max_shard_size: int | None = None,
) -> pathlib.Path:
    """Writes ``model`` as a Hugging Face directory (or a PEFT adapter) torch loads.

    Args:
      model: the model, with or without LoRA adapters.
      directory: created if needed; existing files of the same names are overwritten.
      tokenizer: also write its files (``tokenizer.json``, ``tokenizer_config.json``, chat
        template); its EOS ids go to ``generation_config.json``.
      merge_lora: fold attached adapters into the base weights (``W + s·B·A``); with
        False the base weights are written without them.
      adapter_only: write only the adapters, in PEFT's format (``adapter_model.safetensors``
        with ``base_model.model.…lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r), and
        ``adapter_config.json``); the model must carry LoRA.
      max_shard_size: bytes per safetensors shard; None writes one ``model.safetensors``,
        otherwise shards ``model-0000i-of-0000n.safetensors`` and an index.

    Returns:
      ``directory`` as a ``pathlib.Path``.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if adapter_only:
        tensors = _contiguous(lora_lib.lora_hf_state_dict(model))
        if not tensors:
            raise ValueError("adapter_only=True, but the model carries no LoRA adapters.")
        safetensors.numpy.save_file(
            tensors, str(directory / _ADAPTER_WEIGHTS), metadata={"format": "pt"}
        )
        _write_json(directory / _ADAPTER_CONFIG, lora_lib.lora_hf_config(model))
    else:
        tensors = _contiguous(hf_state_dict(model, merge_lora=merge_lora))
        torch_dtype = str(next(iter(tensors.values())).dtype)
        _write_json(directory / "config.json", model.config.to_hf(torch_dtype=torch_dtype))
        _write_safetensors(tensors, directory, max_shard_size)
        eos = (
            list(tokenizer.eos_token_ids)
            if tokenizer is not None
            else list(model.config.eos_token_ids)
        )
        if eos:
            generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": eos}
            if tokenizer is not None:
                generation["pad_token_id"] = tokenizer.pad_token_id
            _write_json(directory / "generation_config.json", generation)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def load_adapter(
    model: Transformer, directory: str | os.PathLike[str], *, rngs: nnx.Rngs | None = None
) -> Transformer:
    """Attaches the PEFT LoRA adapter in ``directory`` to ``model`` (in place) and returns it.

    Reads what ``save_pretrained(adapter_only=True)`` or ``peft`` writes: plain LoRA
    (no rsLoRA, DoRA, bias or ``fan_in_fan_out``) on fedsp's target projections.

    Args:
      model: a model without adapters, e.g. the base from :func:`from_pretrained`.
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      rngs: for ``apply_lora`` (every adapter value is then overwritten).

    Raises:
      FileNotFoundError: ``adapter_config.json`` or ``adapter_model.safetensors`` is missing.
      ValueError: invalid JSON, an unsupported adapter option, or adapter tensors that are
        missing, unexpected or of the wrong shape for ``model``.
    """
    directory = pathlib.Path(directory)
    config_file, weights_file = directory / _ADAPTER_CONFIG, directory / _ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: missing; an adapter directory needs {_ADAPTER_CONFIG} and "
                f"{_ADAPTER_WEIGHTS}."
            )
    try:
        adapter = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: invalid JSON ({e}).") from e
    if adapter.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{config_file}: peft_type={adapter.get('peft_type')!r}; only 'LORA' is supported."
        )
    unsupported = {
        k: adapter[k] for k in ("use_rslora", "use_dora", "fan_in_fan_out") if adapter.get(k)
    }
    if adapter.get("bias", "none") != "none":
        unsupported["bias"] = adapter["bias"]
    if unsupported:
        raise ValueError(f"{config_file}: unsupported LoRA options {unsupported}.")
    targets = adapter.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(
            f"{config_file}: target_modules={targets!r}; expected a list of projection names."
        )
    layers = adapter.get("layers_to_transform")
    try:
        lora_config = lora_lib.LoRAConfig(
            rank=int(adapter["r"]),
            alpha=float(adapter["lora_alpha"]),
            targets=tuple(targets),
            layers=None
            if layers is None
            else tuple([layers] if isinstance(layers, int) else layers),
        )
        lora_lib.apply_lora(model, lora_config, rngs=rngs if rngs is not None else nnx.Rngs(0))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from e

    tensors = _read_safetensors_file(weights_file)
    adapted = (
        range(model.config.num_hidden_layers) if lora_config.layers is None else lora_config.layers
    )
    expected: set[str] = set()
    for target in lora_config.targets:
        lora = lora_lib.target_linear(model, target).lora
        if lora is None:  # apply_lora above attached one to every target
            raise ValueError(f"{config_file}: no adapter on {target}")
        module = ".".join(lora_lib.LORA_TARGETS[target])
        # PEFT stores A as (r, in) and B as (out, r); fedsp stacks A [L, in, r], B [L, r, out].
        for variable, suffix in ((lora.lora_a, "lora_A"), (lora.lora_b, "lora_B")):
            stacked = np.zeros(variable.shape, np.float32)  # layers without an adapter stay 0
            for i in adapted:
                key = f"base_model.model.model.layers.{i}.{module}.{suffix}.weight"
                expected.add(key)
                if key not in tensors:
                    raise ValueError(f"{weights_file}: missing tensor {key!r}.")
                if tensors[key].shape != stacked.shape[:0:-1]:
                    raise ValueError(
                        f"{weights_file}: tensor {key!r} has shape {tensors[key].shape}, "
                        f"expected {stacked.shape[:0:-1]}."
                    )
                stacked[i] = tensors[key].T
            variable.set_value(jnp.asarray(stacked, variable.dtype))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ValueError(f"{weights_file}: unexpected tensors for {_ADAPTER_CONFIG}: {extra[:10]}")
    return model


def _param_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}.")
        return _DTYPES[dtype]
    try:
        name = jnp.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}.") from e
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_DTYPES)}.")
    return _DTYPES[name]


def _config_from_hf(hf_config: Mapping[str, Any], source: pathlib.Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        message = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{source}: {message}") from e


def _contiguous(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # safetensors.numpy writes from the array's data pointer: a transposed (non-contiguous)
    # view would be written in the wrong element order without any error.
    return {name: np.ascontiguousarray(array) for name, array in tensors.items()}


def _write_safetensors(
    tensors: Mapping[str, np.ndarray], directory: pathlib.Path, max_shard_size: int | None
) -> None:
    if max_shard_size is None:
        safetensors.numpy.save_file(
            dict(tensors), str(directory / _WEIGHTS), metadata={"format": "pt"}
        )
        return
    if max_shard_size <= 0:
        raise ValueError(
            f"max_shard_size={max_shard_size}; expected a positive number of bytes or None."
        )
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(a.nbytes for a in tensors.values())
    _write_json(directory / _INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(file: pathlib.Path, value: Mapping[str, Any]) -> None:
    file.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
