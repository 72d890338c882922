"""fedsp.model.lora: fresh adapters are a no-op, merging is exact, only adapters train."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fedsp.model.config import ModelConfig
from fedsp.model.hf_weights import hf_state_dict, load_hf_state_dict
from fedsp.model.layers import lora_delta
from fedsp.model.lora import (
    LORA_TARGETS,
    LoRAConfig,
    LoRAScale,
    apply_lora,
    lora_hf_config,
    lora_hf_state_dict,
    lora_state,
    merge_lora_into_base,
    split_lora,
)
from fedsp.model.transformer import Transformer
from tests.model import tiny

HF = tiny.tiny_hf_config("qwen2")  # has q/k/v biases, so merging must leave them alone
IDS, MASK = tiny.left_padded_batch(128, [24, 17, 5, 1], 24, seed=1)


@pytest.fixture(scope="module")
def torch_model():
    return tiny.torch_model(HF)


def _model(torch_model, lora: LoRAConfig | None = None, seed: int = 1) -> Transformer:
    model = Transformer(ModelConfig.from_hf(HF), rngs=nnx.Rngs(0))
    load_hf_state_dict(model, tiny.torch_state_dict(torch_model))
    if lora is not None:
        apply_lora(model, lora, rngs=nnx.Rngs(seed))
    return model


def _perturb_b(model: Transformer, seed: int = 0, scale: float = 0.05) -> Transformer:
    graphdef, lora, base = split_lora(model)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), base)


def test_fresh_adapter_leaves_logits_unchanged(torch_model):
    base = tiny.logits(_model(torch_model), IDS, MASK)
    model = _model(torch_model, LoRAConfig(rank=4, alpha=8.0))
    b = model.layers.mlp.down_proj.lora.lora_b.get_value()
    assert b.shape == (2, 4, 64) and not np.any(np.asarray(b))
    assert np.abs(np.asarray(model.layers.mlp.down_proj.lora.lora_a.get_value())).max() > 0
    np.testing.assert_allclose(tiny.logits(model, IDS, MASK), base, atol=1e-6)


def test_lora_is_w_plus_scaled_ab_on_one_projection(torch_model):
    model = _perturb_b(_model(torch_model, LoRAConfig(rank=3, alpha=12.0, targets=("v",))))
    linear = model.layers.self_attn.v_proj
    layer = 1
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    w = np.asarray(linear.kernel.get_value())[layer]
    bias = np.asarray(linear.bias.get_value())[layer]
    a = np.asarray(linear.lora.lora_a.get_value())[layer]
    b = np.asarray(linear.lora.lora_b.get_value())[layer]
    expected = x @ w + bias + (12.0 / 3) * (x @ a @ b)
    layer_module = nnx.merge(*nnx.split(linear))
    state = jax.tree.map(lambda v: v[layer], nnx.state(layer_module))
    nnx.update(layer_module, state)
    np.testing.assert_allclose(layer_module(jnp.asarray(x)), expected, atol=1e-5)


def test_merged_equals_unmerged_and_matches_torch(torch_model):
    model = _perturb_b(_model(torch_model, LoRAConfig(rank=4, alpha=8.0)))
    unmerged = tiny.logits(model, IDS, MASK)
    merged_model = merge_lora_into_base(model)
    assert merged_model.lora_config is None and model.lora_config is not None
    assert nnx.state(merged_model, nnx.LoRAParam) == nnx.State({})
    merged = tiny.logits(merged_model, IDS, MASK)
    valid = MASK.astype(bool)
    assert np.abs(merged - unmerged)[valid].max() < 1e-5
    base = tiny.logits(_model(torch_model), IDS, MASK)
    assert np.abs(unmerged - base)[valid].max() > 1e-2  # the adapters do something
    # The merged export is the adapted model in torch too.
    sd = hf_state_dict(model, merge_lora=True)
    for name, value in hf_state_dict(merged_model).items():
        np.testing.assert_array_equal(sd[name], value, err_msg=name)
    torch_merged = tiny.torch_model(HF)
    import torch

    torch_merged.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=False
    )
    assert np.abs(tiny.torch_logits(torch_merged, IDS, MASK) - unmerged)[valid].max() < 1e-4
    # merge_lora=False exports the frozen base.
    base_sd = hf_state_dict(model, merge_lora=False)
    for name, value in tiny.torch_state_dict(torch_model).items():
        np.testing.assert_array_equal(base_sd[name], value, err_msg=name)


def test_only_lora_params_get_gradients(torch_model):
    model = _perturb_b(_model(torch_model, LoRAConfig(rank=4, alpha=8.0, layers=(1,))))
    graphdef, lora, base = split_lora(model)
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)

    def loss(lora_params):
        logits = nnx.merge(graphdef, lora_params, base)(ids, mask)
        return jnp.mean(jax.nn.logsumexp(logits, -1) * mask)

    grads = jax.jit(jax.grad(loss))(lora)
    assert jax.tree.structure(grads) == jax.tree.structure(lora)

    def is_var(x):
        return isinstance(x, nnx.Variable)

    variables = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=is_var)
    lora_vars = jax.tree.leaves(lora, is_leaf=is_var)
    assert all(isinstance(v, nnx.LoRAParam) for v in lora_vars)
    # 7 targets × (A, B); the base (every non-LoRA Param) is not among them.
    assert len(lora_vars) == 14 and len(variables) > len(lora_vars)
    g = grads["layers"]["mlp"]["up_proj"]["lora"]
    a_grad, b_grad = np.asarray(g["lora_a"].get_value()), np.asarray(g["lora_b"].get_value())
    # Layer 0 has no adapter (scale 0): exactly zero gradient; layer 1 trains.
    assert not a_grad[0].any() and not b_grad[0].any()
    assert np.abs(a_grad[1]).max() > 0 and np.abs(b_grad[1]).max() > 0
    # nnx.grad with a LoRAParam DiffState gives the same numbers.
    nnx_grads = nnx.jit(
        nnx.grad(
            lambda m: jnp.mean(jax.nn.logsumexp(m(ids, mask), -1) * mask),
            argnums=nnx.DiffState(0, nnx.LoRAParam),
        )
    )(model)
    np.testing.assert_allclose(
        nnx_grads["layers"]["mlp"]["up_proj"]["lora"]["lora_b"].get_value(), b_grad, atol=1e-6
    )


def test_lora_delta_backward_equals_autodiff():
    """The hand-written backward of s·(xA)B (which keeps XLA from transposing the big
    operands) gives autodiff's gradients for x, A and B; the scale gets none."""
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 5, 8))
    a = jax.random.normal(k[1], (8, 3))
    b = jax.random.normal(k[2], (3, 6))
    w = jax.random.normal(k[3], (2, 5, 6))
    s = jnp.float32(1.7)

    def reference(x, a, b):
        return jnp.sum(jnp.sin((x @ a @ b) * s) * w)

    def custom(x, a, b):
        return jnp.sum(jnp.sin(lora_delta(x, a, b, s)) * w)

    np.testing.assert_allclose(custom(x, a, b), reference(x, a, b), rtol=1e-6)
    for got, want in zip(
        jax.jit(jax.grad(custom, (0, 1, 2)))(x, a, b), jax.grad(reference, (0, 1, 2))(x, a, b)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert float(jax.grad(lambda s: jnp.sum(lora_delta(x, a, b, s)))(s)) == 0.0


def test_layer_subset_adapts_only_those_layers(torch_model):
    model = _model(torch_model, LoRAConfig(rank=2, alpha=4.0, layers=(1,), targets=("q", "down")))
    scale = np.asarray(model.layers.self_attn.q_proj.lora.scale.get_value())
    np.testing.assert_array_equal(scale, [0.0, 2.0])
    assert isinstance(model.layers.self_attn.q_proj.lora.scale, LoRAScale)
    assert model.layers.self_attn.k_proj.lora is None
    model = _perturb_b(model)
    export = lora_hf_state_dict(model)
    assert sorted(export) == sorted(
        f"base_model.model.model.layers.1.{m}.lora_{ab}.weight"
        for m in ("self_attn.q_proj", "mlp.down_proj")
        for ab in "AB"
    )


def test_peft_export_reproduces_the_merged_weights(torch_model):
    model = _perturb_b(_model(torch_model, LoRAConfig(rank=4, alpha=8.0)))
    export = lora_hf_state_dict(model)
    merged = hf_state_dict(model, merge_lora=True)
    base = tiny.torch_state_dict(torch_model)
    for path in LORA_TARGETS.values():
        for i in range(2):
            prefix = f"base_model.model.model.layers.{i}.{'.'.join(path)}"
            a, b = export[f"{prefix}.lora_A.weight"], export[f"{prefix}.lora_B.weight"]
            w = base[f"model.layers.{i}.{'.'.join(path)}.weight"]
            assert a.shape == (4, w.shape[1]) and b.shape == (w.shape[0], 4)
            # PEFT: W' = W + (lora_alpha / r) · B A.
            np.testing.assert_allclose(
                merged[f"model.layers.{i}.{'.'.join(path)}.weight"], w + 2.0 * b @ a, atol=1e-6
            )


def test_lora_hf_config_fields(torch_model):
    config = LoRAConfig(rank=8, alpha=16.0, targets=("q_proj", "v"), layers=(0,))
    model = _model(torch_model, config)
    cfg = lora_hf_config(model)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"]) == (8, 16.0)
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == [0]
    assert lora_hf_config(LoRAConfig())["target_modules"] == list(LORA_TARGETS)


def test_lora_state_is_what_split_returns(torch_model):
    model = _model(torch_model, LoRAConfig(rank=2, alpha=2.0, targets=("o",)))
    _, lora, _ = split_lora(model)
    assert jax.tree.map(np.shape, lora) == jax.tree.map(np.shape, lora_state(model))
    shapes = jax.tree.map(np.shape, lora)["layers"]["self_attn"]["o_proj"]["lora"]
    assert shapes["lora_a"].get_value() == (2, 64, 2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"targets": ("q_proj", "lm_head")}, "targets"),
        ({"targets": "q_proj"}, "targets"),
        ({"targets": ()}, "targets"),
        ({"rank": 0}, "rank"),
        ({"alpha": 0.0}, "alpha"),
    ],
)
def test_bad_lora_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoRAConfig(**kwargs)


def test_apply_lora_errors(torch_model):
    model = _model(torch_model)
    with pytest.raises(ValueError, match="layers"):
        apply_lora(model, LoRAConfig(layers=(0, 5)), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no LoRA"):
        lora_hf_state_dict(_model(torch_model))
