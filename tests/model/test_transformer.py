"""fedsp.model.config / transformer: logit parity with torch transformers, state dicts, errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.test_util import check_grads

from fedsp.model.config import ModelConfig
from fedsp.model.hf_weights import hf_state_dict, hf_tensor_shapes, load_hf_state_dict
from fedsp.model.layers import apply_rope, attend, rope_inv_freq
from fedsp.model.transformer import RMSNorm, Transformer, default_positions
from tests.model import tiny


@pytest.fixture(scope="module", params=tiny.KINDS)
def pair(request):
    """(kind, torch model, fedsp model with the torch weights)."""
    hf = tiny.tiny_hf_config(request.param)
    torch_model = tiny.torch_model(hf)
    config = ModelConfig.from_hf(torch_model.config.to_dict())
    model = Transformer(config, rngs=nnx.Rngs(0))
    load_hf_state_dict(model, tiny.torch_state_dict(torch_model))
    return request.param, torch_model, model


def test_logit_parity_left_padded(pair):
    kind, torch_model, model = pair
    ids, mask = tiny.left_padded_batch(128, [24, 17, 5, 1], 24, seed=1)
    ref = tiny.torch_logits(torch_model, ids, mask)
    out = tiny.logits(model, ids, mask)
    err = np.abs(out - ref)[mask.astype(bool)].max()
    print(f"{kind}: max |Δlogit| vs transformers (left padding) = {err:.2e}")
    assert out.dtype == np.float32
    assert err < 1e-4


def test_logit_parity_right_padded_and_unmasked(pair):
    _, torch_model, model = pair
    ids, _ = tiny.left_padded_batch(128, [24] * 4, 24, seed=2)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0  # right padding: real tokens keep positions 0..11
    ref = tiny.torch_logits(torch_model, ids, mask)
    out = tiny.logits(model, ids, mask)
    assert np.abs(out - ref)[mask.astype(bool)].max() < 1e-4
    np.testing.assert_allclose(
        tiny.logits(model, ids), tiny.torch_logits(torch_model, ids), atol=1e-4
    )


def test_padding_side_does_not_change_a_row(pair):
    _, _, model = pair
    left_ids, left_mask = tiny.left_padded_batch(128, [24, 14, 9, 3], 24, seed=3)
    # The same rows right-padded: causal attention never lets a real token see a pad.
    right_ids, right_mask = np.zeros_like(left_ids), np.zeros_like(left_mask)
    for r in range(4):
        n = left_mask[r].sum()
        right_ids[r, :n], right_mask[r, :n] = left_ids[r, 24 - n :], 1
    left = tiny.logits(model, left_ids, left_mask)
    right = tiny.logits(model, right_ids, right_mask)
    for r in range(4):
        n = left_mask[r].sum()
        np.testing.assert_allclose(left[r, 24 - n :], right[r, :n], atol=2e-5)


def test_jit_matches_eager():
    hf = tiny.tiny_hf_config("qwen2")
    model = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    load_hf_state_dict(model, tiny.torch_state_dict(tiny.torch_model(hf)))
    ids, mask = tiny.left_padded_batch(128, [24, 17, 5, 1], 24, seed=4)
    eager = model(jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(tiny.logits(model, ids, mask), eager, atol=1e-5)


def test_hf_state_dict_round_trips_exactly(pair):
    _, torch_model, model = pair
    ref = tiny.torch_state_dict(torch_model)
    ref = {k: v for k, v in ref.items() if not k.endswith("rotary_emb.inv_freq")}
    out = hf_state_dict(model)
    assert set(out) == set(ref)
    assert ("lm_head.weight" in out) == (not model.config.tie_word_embeddings)
    for name, value in ref.items():
        assert out[name].dtype == value.dtype, name
        np.testing.assert_array_equal(out[name], value, err_msg=name)


def test_rope_inv_freq_matches_transformers():
    for kind in ("llama", "llama3"):
        hf = tiny.tiny_hf_config(kind)
        torch_config = transformers.AutoConfig.for_model(**hf)
        rope_type = (hf.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type == "default":
            d = torch_config.head_dim
            ref = 1.0 / (hf["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float32) / d))
        else:
            fn = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]
            ref = fn(torch_config, "cpu")[0].numpy()
        ours = rope_inv_freq(ModelConfig.from_hf(hf))
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # The llama3 scaling must actually change the low frequencies.
    scaled = rope_inv_freq(ModelConfig.from_hf(tiny.tiny_hf_config("llama3")))
    plain = rope_inv_freq(
        dataclasses.replace(ModelConfig.from_hf(tiny.tiny_hf_config("llama3")), rope_scaling=None)
    )
    assert scaled[-1] == pytest.approx(plain[-1] / 8.0) and np.all(scaled <= plain)


def test_default_positions_golden():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]])


def test_rmsnorm_golden_and_grads():
    norm = RMSNorm(3, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
    norm.weight.set_value(jnp.array([1.0, 2.0, 0.5]))
    x = jnp.array([[3.0, -4.0, 0.0]])
    rms = np.sqrt((9 + 16 + 0) / 3 + 1e-6)
    np.testing.assert_allclose(norm(x), [[3 / rms, -8 / rms, 0.0]], rtol=1e-6)
    check_grads(
        jax.jit(norm),
        (jnp.array([[0.3, -1.2, 2.0]]),),
        order=1,
        modes=("rev",),
        atol=1e-2,
        rtol=1e-2,
    )


def test_rope_is_a_rotation_with_relative_phase():
    config = ModelConfig.from_hf(tiny.tiny_hf_config("llama"))
    inv = rope_inv_freq(config)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def rot(x, pos):
        angles = jnp.full((1, 1), float(pos))[..., None] * inv
        angles = jnp.concatenate([angles, angles], -1)
        return apply_rope(x, jnp.cos(angles), jnp.sin(angles))

    # Norm-preserving, and q·k depends only on the position difference.
    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 7)), jnp.linalg.norm(q), rtol=1e-5)

    def dot(a, b):
        return float(jnp.sum(rot(q, a) * rot(k, b)))

    assert dot(10, 3) == pytest.approx(dot(27, 20), rel=1e-4)


def test_attend_matches_numpy_and_grads():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)  # H = 4
    k = rng.normal(size=(2, 2, 5, 8)).astype(np.float32)  # K = 2
    v = rng.normal(size=(2, 2, 5, 8)).astype(np.float32)
    mask = rng.random((2, 3, 5)) < 0.7
    mask[..., 0] = True
    out = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask)))
    ref = np.zeros((2, 3, 4, 8), np.float32)
    for b in range(2):
        for h in range(4):
            s = q[b, :, h] @ k[b, h // 2].T / np.sqrt(8)
            s = np.where(mask[b], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            ref[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, h // 2]
    np.testing.assert_allclose(out, ref.reshape(2, 3, 32), atol=1e-5)

    def fn(q, k, v):
        return attend(q, k, v, jnp.asarray(mask))

    check_grads(
        jax.jit(fn),
        (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)),
        order=1,
        modes=("rev",),
        atol=1e-2,
        rtol=1e-2,
    )


def test_bf16_params_give_float32_logits_close_to_fp32():
    hf = tiny.tiny_hf_config("smollm")
    tensors = tiny.torch_state_dict(tiny.torch_model(hf))
    config = ModelConfig.from_hf(hf)
    m32 = Transformer(config, rngs=nnx.Rngs(0))
    m16 = Transformer(config, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    load_hf_state_dict(m32, tensors)
    load_hf_state_dict(m16, tensors)
    assert m16.layers.mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    ids, mask = tiny.left_padded_batch(128, [24, 17, 5, 1], 24, seed=1)
    l32, l16 = tiny.logits(m32, ids, mask), tiny.logits(m16, ids, mask)
    assert l16.dtype == np.float32
    valid = mask.astype(bool)
    err = np.abs(l16 - l32)[valid].max()
    assert 0 < err < 0.1 * np.abs(l32)[valid].max()
    assert hf_state_dict(m16)["model.norm.weight"].dtype == jnp.bfloat16


def test_load_into_abstract_model():
    hf = tiny.tiny_hf_config("qwen2")
    torch_model = tiny.torch_model(hf)
    config = ModelConfig.from_hf(hf)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    load_hf_state_dict(model, tiny.torch_state_dict(torch_model))
    ids, mask = tiny.left_padded_batch(128, [24, 17, 5, 1], 24, seed=1)
    ref = tiny.torch_logits(torch_model, ids, mask)
    assert np.abs(tiny.logits(model, ids, mask) - ref).max() < 1e-4


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
    config = ModelConfig.from_hf(tiny.tiny_hf_config("llama"))
    ids, mask = tiny.left_padded_batch(128, [6, 4], 6)

    def grads(remat):
        graphdef, state = nnx.split(Transformer(config, rngs=nnx.Rngs(0), remat=remat))

        def loss(s):
            return jnp.mean(nnx.merge(graphdef, s)(ids, mask) ** 2)

        return jax.jit(jax.grad(loss))(state)

    plain, rematerialised = grads("none"), grads(remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), plain, rematerialised)
    up = np.asarray(plain["layers"]["mlp"]["up_proj"]["kernel"].get_value())
    assert np.abs(up).max() > 0


def test_unknown_remat_policy_names_the_choices():
    config = ModelConfig.from_hf(tiny.tiny_hf_config("llama"))
    with pytest.raises(ValueError, match=r"remat must be one of \('none', 'full', 'dots'\)"):
        Transformer(config, rngs=nnx.Rngs(0), remat=True)


def test_scan_compiles_the_layer_once():
    # 12 layers must not compile 12 layer bodies: the HLO of a 12-layer model is about
    # the size of a 2-layer one.
    def hlo_size(n):
        config = ModelConfig.from_hf({**tiny.tiny_hf_config("llama"), "num_hidden_layers": n})
        graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
        fn = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))
        return len(fn.lower(state, jax.ShapeDtypeStruct((1, 4), jnp.int32)).as_text())

    sizes = {n: hlo_size(n) for n in (2, 12)}
    assert sizes[12] < 1.1 * sizes[2]


# ------------------------------------------------------------------ state-dict errors


@pytest.fixture(scope="module")
def llama():
    hf = tiny.tiny_hf_config("llama")
    tensors = tiny.torch_state_dict(tiny.torch_model(hf))
    return Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0)), tensors


def test_load_missing_tensor_names_it(llama):
    model, tensors = llama
    bad = dict(tensors)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_state_dict(model, bad)


def test_load_wrong_shape_names_tensor_and_shapes(llama):
    model, tensors = llama
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 63), np.float32)
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(32, 63\).*\(32, 64\)"):
        load_hf_state_dict(model, bad)


def test_load_extra_tensor_listed_and_inv_freq_ignored(llama):
    model, tensors = llama
    ok = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)}
    load_hf_state_dict(model, ok)
    bad = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected.*q_proj\.bias"):
        load_hf_state_dict(model, bad)


def test_hf_tensor_shapes_are_torch_layout(llama):
    model, _ = llama
    shapes = hf_tensor_shapes(model)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (64, 96)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["lm_head.weight"] == (128, 64)
    assert len(shapes) == 3 + 2 * 9


# ------------------------------------------------------------------ config


def test_config_round_trips_through_transformers():
    for kind in tiny.KINDS:
        config = ModelConfig.from_hf(tiny.tiny_hf_config(kind))
        torch_config = transformers.AutoConfig.for_model(**config.to_hf())
        assert type(torch_config).__name__.lower().startswith(config.model_type)
        assert ModelConfig.from_hf(torch_config.to_dict()) == config, kind
        hash(config)  # usable as a static jit argument


def test_config_reads_both_rope_spellings():
    v4 = {**tiny.tiny_hf_config("llama3")}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": v4["rope_theta"]}
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
    assert ModelConfig.from_hf(v5).rope_theta == 5e5
    assert ModelConfig.from_hf(tiny.tiny_hf_config("qwen2")).attention_bias
    alias = ModelConfig.from_hf({**tiny.tiny_hf_config("llama"), "model_type": "smollm"})
    assert alias.model_type == "llama"


def test_config_defaults_and_eos_ids():
    config = ModelConfig(
        vocab_size=10,
        hidden_size=64,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=[3, 4],
    )
    assert config.head_dim == 16 and config.num_query_groups == 2
    assert config.eos_token_ids == (3, 4)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"num_attention_heads": 5}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, "low_freq_factor"),
        ({"vocab_size": 0}, "vocab_size"),
    ],
)
def test_config_errors_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf({**tiny.tiny_hf_config("llama"), **change})


def test_bad_inputs():
    model = Transformer(ModelConfig.from_hf(tiny.tiny_hf_config("llama")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.ones((2, 4), jnp.int32), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="positions"):
        model(jnp.ones((2, 4), jnp.int32), positions=jnp.ones((2, 3), jnp.int32))


def test_torch_oracle_is_not_trivial():
    # Guard the parity tests: the oracle's norms and biases are randomised.
    sd = tiny.torch_state_dict(tiny.torch_model(tiny.tiny_hf_config("qwen2")))
    assert np.abs(sd["model.layers.0.self_attn.q_proj.bias"]).max() > 0.1
    assert np.abs(sd["model.norm.weight"] - 1).max() > 0.1
    assert torch.get_default_dtype() == torch.float32
