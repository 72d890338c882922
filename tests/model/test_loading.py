"""Tests for fedsp.model.loading and fedsp.model.gguf against torch transformers.

Tiny random Llama/Qwen2 checkpoints are written by transformers itself (sharded and not),
loaded by fedsp, and compared logit for logit with the torch model; fedsp's exports are
read back by transformers (HF directories and GGUF files, the latter through transformers'
own GGUF reader and q/k un-permutation, an independent check of fedsp's).
"""

from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import transformers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers

from fedsp.model import (
    ModelConfig,
    Tokenizer,
    Transformer,
    from_pretrained,
    load_adapter,
    save_pretrained,
)
from fedsp.model import gguf as fedsp_gguf
from fedsp.model import lora as lora_lib
from fedsp.model.hf_weights import hf_state_dict
from fedsp.model.loading import read_safetensors
from tests.model import tiny

TOL = 1e-4
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_tokenizer() -> Tokenizer:
    """Byte-level BPE: 3 specials, 256 byte tokens and 2 merges (vocab 261)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {
        t: i
        for i, t in enumerate(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "he", "hel"]
        )
    }
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("he", "l")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in list(vocab)[:3]])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", chat_template=CHATML,
    )  # fmt: skip
    return Tokenizer(hf)


def _batch(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the second left-padded: [2, 12] ids and mask."""
    return tiny.left_padded_batch(vocab_size, [12, 7], 12, seed=3)


@nnx.jit
def _jit_logits(model: Transformer, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model(ids, mask)


def _fedsp_logits(model: Transformer, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(_jit_logits(model, jnp.asarray(ids), jnp.asarray(mask)))


def _assert_close(
    ours: np.ndarray, reference: np.ndarray, mask: np.ndarray, tol: float = TOL
) -> float:
    """max |Δlogit| over real (unpadded) positions, asserted below ``tol``."""
    delta = float(np.max(np.abs(ours - reference) * mask[..., None]))
    assert delta < tol, delta
    return delta


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_checkpoint(request, tmp_path_factory):
    """(kind, torch model, HF directory written by transformers; llama's is sharded)."""
    kind = request.param
    torch_model = tiny.torch_model(tiny.tiny_hf_config(kind))
    directory = tmp_path_factory.mktemp(f"hf_{kind}")
    shard = "40KB" if kind == "llama" else "1GB"
    torch_model.save_pretrained(directory, max_shard_size=shard)
    return kind, torch_model, directory


def test_transformers_checkpoint_loads_with_logit_parity(hf_checkpoint):
    kind, torch_model, directory = hf_checkpoint
    if kind == "llama":
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("model-*.safetensors"))) > 1
    model, tokenizer = from_pretrained(directory)
    assert tokenizer is None  # the directory has no tokenizer.json
    assert model.config.model_type == kind and model.config.attention_bias == (kind == "qwen2")
    ids, mask = _batch(model.config.vocab_size)
    _assert_close(_fedsp_logits(model, ids, mask), tiny.torch_logits(torch_model, ids, mask), mask)


def test_export_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path):
    _, torch_model, directory = hf_checkpoint
    model, _ = from_pretrained(directory)
    save_pretrained(model, tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids, mask = _batch(model.config.vocab_size)
    expected = tiny.torch_logits(torch_model, ids, mask)
    _assert_close(tiny.torch_logits(reloaded, ids, mask), expected, mask)
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]


def test_bfloat16_load_keeps_float32_logits(llama_dir):
    torch_model = tiny.torch_model(tiny.tiny_hf_config("llama"))  # seeded: the model in llama_dir
    model, _ = from_pretrained(llama_dir, dtype="bfloat16")
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    ids, mask = _batch(model.config.vocab_size)
    logits = _fedsp_logits(model, ids, mask)
    assert logits.dtype == np.float32
    # bf16 weights and activations: a loose bound, but far below the logits' spread.
    reference = tiny.torch_logits(torch_model, ids, mask)
    assert np.max(np.abs(logits - reference) * mask[..., None]) < 0.1 * np.abs(reference).max()


def test_sharded_export_round_trips_exactly(tmp_path):
    hf_config = tiny.tiny_hf_config("smollm")
    torch_model = tiny.torch_model(hf_config)
    torch_model.save_pretrained(tmp_path / "src")
    model, _ = from_pretrained(tmp_path / "src")
    save_pretrained(model, tmp_path / "out", max_shard_size=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "lm_head.weight" not in index["weight_map"]  # tied
    written = read_safetensors(tmp_path / "out")
    expected = tiny.torch_state_dict(torch_model)
    assert set(written) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = _batch(hf_config["vocab_size"])
    _assert_close(
        tiny.torch_logits(reloaded, ids, mask), tiny.torch_logits(torch_model, ids, mask), mask
    )


def test_lora_export_merged_and_adapter_only(tmp_path):
    hf_config = tiny.tiny_hf_config("llama")
    tiny.torch_model(hf_config).save_pretrained(tmp_path / "base")
    model, _ = from_pretrained(tmp_path / "base")
    base_weights = hf_state_dict(model)
    lora_config = lora_lib.LoRAConfig(
        rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), layers=(1,)
    )
    lora_lib.apply_lora(model, lora_config, rngs=nnx.Rngs(1))
    # A fresh adapter has B = 0; give it values so the merge is not trivially the base.
    for target in lora_config.targets:
        lora = lora_lib.target_linear(model, target).lora
        lora.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(7), lora.lora_b.shape))
    ids, mask = _batch(hf_config["vocab_size"])
    with_lora = _fedsp_logits(model, ids, mask)

    save_pretrained(model, tmp_path / "merged")
    save_pretrained(model, tmp_path / "adapter", adapter_only=True)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    # 1. transformers runs the merged export like fedsp runs base + adapter.
    merged_torch = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    _assert_close(tiny.torch_logits(merged_torch, ids, mask), with_lora, mask)

    # 2. Merging the exported PEFT tensors by hand, W + (alpha/r)·B·A, gives the merged weights.
    adapter = safetensors.numpy.load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (
        adapter_config["r"],
        adapter_config["lora_alpha"],
        adapter_config["layers_to_transform"],
    ) == (4, 8.0, [1])
    merged = read_safetensors(tmp_path / "merged")
    scale = adapter_config["lora_alpha"] / adapter_config["r"]
    for name, base in base_weights.items():
        expected = base
        module = name.removesuffix(".weight")
        key_a = f"base_model.model.{module}.lora_A.weight"
        if key_a in adapter:
            a, b = adapter[key_a], adapter[f"base_model.model.{module}.lora_B.weight"]
            assert a.shape == (4, base.shape[1]) and b.shape == (base.shape[0], 4)
            expected = base + scale * b @ a
        np.testing.assert_allclose(merged[name], expected, atol=1e-6, err_msg=name)
    assert len(adapter) == 2 * 3  # A and B of 3 targets on the one adapted layer

    # 3. The adapter export loads back onto the base with our own loader.
    base, _ = from_pretrained(tmp_path / "base")
    restored = load_adapter(base, tmp_path / "adapter")
    np.testing.assert_allclose(_fedsp_logits(restored, ids, mask), with_lora, atol=1e-5)


def test_load_adapter_rejects_bad_adapters(tmp_path):
    tiny.torch_model(tiny.tiny_hf_config("llama")).save_pretrained(tmp_path / "base")
    model, _ = from_pretrained(tmp_path / "base")
    lora_lib.apply_lora(
        model, lora_lib.LoRAConfig(rank=2, alpha=2.0, targets=("q_proj",)), rngs=nnx.Rngs(0)
    )
    save_pretrained(model, tmp_path / "adapter", adapter_only=True)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    weights_file = tmp_path / "adapter" / "adapter_model.safetensors"

    def fresh():
        return from_pretrained(tmp_path / "base")[0]

    tensors = safetensors.numpy.load_file(str(weights_file))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    safetensors.numpy.save_file({**tensors, key: tensors[key][:, :-1]}, str(weights_file))
    with pytest.raises(ValueError, match=rf"{key}' has shape \(2, 63\), expected \(2, 64\)"):
        load_adapter(fresh(), tmp_path / "adapter")
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != key}, str(weights_file))
    with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
        load_adapter(fresh(), tmp_path / "adapter")
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match=r"unsupported LoRA options {'use_dora': True}"):
        load_adapter(fresh(), tmp_path / "adapter")
    config_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json: missing"):
        load_adapter(fresh(), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"carries no LoRA adapters|no LoRA adapters"):
        save_pretrained(fresh(), tmp_path / "none", adapter_only=True)


# ---------------------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tensor_type", ["F32", "Q8_0"])
def test_gguf_export_matches_transformers_gguf_reader(kind, tensor_type, tmp_path):
    hf_config = {**tiny.tiny_hf_config(kind), "vocab_size": 261}
    torch_model = tiny.torch_model(hf_config)
    torch_model.save_pretrained(tmp_path / "hf")
    model, _ = from_pretrained(tmp_path / "hf")
    tokenizer = _byte_tokenizer()
    path = fedsp_gguf.save_gguf(
        tmp_path / "model.gguf", model.config, hf_state_dict(model),
        metadata=tokenizer.gguf_metadata(), tensor_type=tensor_type,
    )  # fmt: skip

    # transformers un-permutes llama's q/k rows itself: an independent check of the layout.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf"
    ).eval()
    ours, gguf_tokenizer = from_pretrained(path)
    ids, mask = _batch(261)
    reference_logits = tiny.torch_logits(reference, ids, mask)
    _assert_close(_fedsp_logits(ours, ids, mask), reference_logits, mask)
    if tensor_type == "F32":  # lossless: both equal the original torch model
        _assert_close(reference_logits, tiny.torch_logits(torch_model, ids, mask), mask)
    else:  # Q8_0 rounds weights; the result still tracks the original closely
        _assert_close(reference_logits, tiny.torch_logits(torch_model, ids, mask), mask, tol=0.05)

    assert gguf_tokenizer.encode("hello <|im_end|>") == tokenizer.encode("hello <|im_end|>")
    assert gguf_tokenizer.hf.convert_ids_to_tokens(gguf_tokenizer.encode("hello"))[0] == "hel"
    assert (
        gguf_tokenizer.apply_chat_template("hi")
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ours.config.model_type == kind and ours.config.vocab_size == 261


def test_gguf_rotary_permutation_is_llama_cpp_layout():
    # llama.cpp's converter, written out: per head, row j of half 0 and row j of half 1
    # become rows 2j and 2j+1.
    heads, head_dim, width = 3, 8, 5
    w = np.arange(heads * head_dim * width, dtype=np.float32).reshape(heads * head_dim, width)
    permuted = fedsp_gguf.permute_rotary(w, heads)
    for h in range(heads):
        for j in range(head_dim // 2):
            np.testing.assert_array_equal(permuted[h * head_dim + 2 * j], w[h * head_dim + j])
            np.testing.assert_array_equal(
                permuted[h * head_dim + 2 * j + 1], w[h * head_dim + head_dim // 2 + j]
            )
    np.testing.assert_array_equal(fedsp_gguf.unpermute_rotary(permuted, heads), w)
    bias = np.arange(heads * head_dim, dtype=np.float32)
    np.testing.assert_array_equal(
        fedsp_gguf.unpermute_rotary(fedsp_gguf.permute_rotary(bias, heads), heads), bias
    )
    with pytest.raises(ValueError, match="multiple of 2·num_heads"):
        fedsp_gguf.unpermute_rotary(np.zeros((10, 4)), 3)


def test_gguf_llama3_rope_scaling_round_trips(tmp_path):
    # GGUF keeps only llama.cpp's per-frequency factors, computed with Llama 3.1/3.2's
    # constants (low 1, high 4, original context 8192); Llama 3.2's factor 32.
    rope_scaling = dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    hf_config = {
        **tiny.tiny_hf_config("llama3"),
        "rope_scaling": dict(rope_scaling),
    }  # transformers edits it
    torch_model = tiny.torch_model(hf_config)
    torch_model.save_pretrained(tmp_path / "hf")
    model, _ = from_pretrained(tmp_path / "hf")
    path = fedsp_gguf.save_gguf(tmp_path / "m.gguf", model.config, hf_state_dict(model))
    checkpoint = fedsp_gguf.load_gguf(path)
    assert checkpoint.hf_config["rope_scaling"] == rope_scaling
    assert "rope_freqs.weight" not in checkpoint.tensors
    tiny_original = ModelConfig.from_hf(tiny.tiny_hf_config("llama3"))  # original context 16
    with pytest.raises(ValueError, match=r"llama.cpp assumes"):
        fedsp_gguf.save_gguf(tmp_path / "x.gguf", tiny_original, {})
    ours, tokenizer = from_pretrained(path)
    assert tokenizer is None  # no tokenizer.* metadata in this file
    ids, mask = _batch(hf_config["vocab_size"])
    _assert_close(_fedsp_logits(ours, ids, mask), tiny.torch_logits(torch_model, ids, mask), mask)


def test_gguf_config_and_names(tmp_path):
    hf_config = tiny.tiny_hf_config("smollm")
    config = ModelConfig.from_hf(hf_config)
    tensors = tiny.torch_state_dict(tiny.torch_model(hf_config))
    path = fedsp_gguf.save_gguf(tmp_path / "m.gguf", config, tensors)
    reader = gguf.GGUFReader(path)
    names = {t.name for t in reader.tensors}
    assert (
        "output.weight" not in names
        and "blk.1.ffn_down.weight" in names
        and "token_embd.weight" in names
    )
    checkpoint = fedsp_gguf.load_gguf(path)
    hf = checkpoint.hf_config
    assert hf["tie_word_embeddings"] is True and hf["architectures"] == ["LlamaForCausalLM"]
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (8, 2, 8)
    assert hf["rope_theta"] == 1e5 and hf["rms_norm_eps"] == 1e-5 and hf["vocab_size"] == 128
    assert ModelConfig.from_hf(hf) == config
    assert set(checkpoint.tensors) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(checkpoint.tensors[name], value, err_msg=name)


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def llama_dir(tmp_path):
    tiny.torch_model(tiny.tiny_hf_config("llama")).save_pretrained(
        tmp_path / "m", max_shard_size="40KB"
    )
    return tmp_path / "m"


def test_missing_paths_and_config_errors(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Model path not found: .*nowhere"):
        from_pretrained(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(
        ValueError, match=r"weights.bin: expected a Hugging Face directory or a .gguf file"
    ):
        from_pretrained(tmp_path / "weights.bin")

    config_file = llama_dir / "config.json"
    text = config_file.read_text()
    config_file.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config.json: invalid JSON"):
        from_pretrained(llama_dir)
    config_file.write_text(json.dumps({**json.loads(text), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: model_type='gpt2' is not supported"):
        from_pretrained(llama_dir)
    config_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"config.json: missing"):
        from_pretrained(llama_dir)


def test_dtype_must_be_a_float_type(llama_dir):
    for bad in ("flaot32", "float64", jnp.int32):
        with pytest.raises(
            ValueError, match=r"dtype=.*expected one of \['bfloat16', 'float16', 'float32'\]"
        ):
            from_pretrained(llama_dir, dtype=bad)


def test_missing_shard_and_truncated_file(llama_dir):
    index = json.loads((llama_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    last = llama_dir / shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        ValueError, match=rf"{shards[-1]}: cannot read safetensors .* truncated or corrupt"
    ):
        from_pretrained(llama_dir)
    last.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards[-1]}: missing; it is listed as a shard"):
        from_pretrained(llama_dir)
    (llama_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json"
    ):
        from_pretrained(llama_dir)


def test_wrong_shape_missing_and_extra_tensors(tmp_path):
    tiny.torch_model(tiny.tiny_hf_config("llama")).save_pretrained(tmp_path)
    weights = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))

    def write(tensors):
        safetensors.numpy.save_file(
            tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"}
        )

    name = "model.layers.1.mlp.up_proj.weight"
    write({**weights, name: weights[name][:-1]})
    with pytest.raises(ValueError, match=rf"{name}' has shape \(95, 64\), expected \(96, 64\)"):
        from_pretrained(tmp_path)
    write({k: v for k, v in weights.items() if k != name})
    with pytest.raises(ValueError, match=f"missing 1 tensor.*{name}"):
        from_pretrained(tmp_path)
    write({**weights, "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor.*model.layers.0.mlp.extra.weight"):
        from_pretrained(tmp_path)


def test_bad_gguf_files(tmp_path):
    hf_config = tiny.tiny_hf_config("llama")
    config = ModelConfig.from_hf(hf_config)
    path = fedsp_gguf.save_gguf(
        tmp_path / "m.gguf", config, tiny.torch_state_dict(tiny.torch_model(hf_config))
    )
    data = path.read_bytes()

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"truncated.gguf: .*truncated"):
        from_pretrained(truncated)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(data[:200])
    with pytest.raises(
        ValueError, match=r"header.gguf: truncated: the header ends past the end of the file"
    ):
        from_pretrained(header_only)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("this is not a model" * 10)
    with pytest.raises(ValueError, match=r"text.gguf: not a GGUF file \(magic b'this'"):
        from_pretrained(not_gguf)

    other = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(other, "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    for write in (
        writer.write_header_to_file,
        writer.write_kv_data_to_file,
        writer.write_tensors_to_file,
    ):
        write()
    writer.close()
    with pytest.raises(
        ValueError,
        match=r"gemma.gguf: unsupported GGUF architecture 'gemma'; supported: \['llama', 'qwen2'\]",
    ):
        from_pretrained(other)

    # A tensor type gguf.quants cannot dequantize (I8 here) is named with its tensor.
    reader = gguf.GGUFReader(path)
    int8 = tmp_path / "int8.gguf"
    writer = gguf.GGUFWriter(int8, "llama")
    for name, field in reader.fields.items():
        if name.startswith("llama."):
            writer.add_key_value(name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        array = np.asarray(tensor.data)
        writer.add_tensor(
            tensor.name, array.astype(np.int8) if tensor.name == "blk.0.ffn_up.weight" else array
        )
    for write in (
        writer.write_header_to_file,
        writer.write_kv_data_to_file,
        writer.write_tensors_to_file,
    ):
        write()
    writer.close()
    with pytest.raises(
        ValueError, match=r"int8.gguf: tensor 'blk.0.ffn_up.weight' has quantization type I8"
    ):
        from_pretrained(int8)

    with pytest.raises(ValueError, match="tensor_type='Q4_K'"):
        fedsp_gguf.save_gguf(tmp_path / "x.gguf", config, {}, tensor_type="Q4_K")
