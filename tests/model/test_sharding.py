"""fedsp.model.sharding: a 2×2 ("clients", "model") mesh shards the base, not the adapters."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fedsp.model.config import ModelConfig
from fedsp.model.hf_weights import load_hf_state_dict
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.sharding import (
    LOGICAL_AXIS_RULES,
    device_bytes,
    logical_to_spec,
    make_mesh,
    mesh_problem,
    mesh_shape,
    model_shardings,
    padded_rows,
    replicate,
    row_multiple,
    shard_model,
    shard_rows,
    shard_state,
)
from fedsp.model.transformer import Transformer
from tests.model import tiny

HF = tiny.tiny_hf_config("qwen2")


def _model() -> Transformer:
    model = Transformer(ModelConfig.from_hf(HF), rngs=nnx.Rngs(0))
    load_hf_state_dict(model, tiny.torch_state_dict(tiny.torch_model(HF)))
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    return model


def test_sharded_model_gives_unsharded_logits_and_shards_the_base():
    assert jax.device_count() >= 4
    model = _model()
    ids, mask = tiny.left_padded_batch(128, [24, 17, 5, 1], 24, seed=1)
    ref = tiny.logits(model, ids, mask)

    mesh = make_mesh(clients=2, model=2)
    shard_model(model, mesh)
    kernel = model.layers.mlp.gate_proj.kernel.get_value()  # [L, embed, mlp]
    assert kernel.sharding.spec == PartitionSpec(None, "model", None)
    assert kernel.addressable_shards[0].data.shape == (2, 32, 96)  # embed split in two
    emb = model.embed_tokens.embedding.get_value()
    assert emb.sharding.spec == PartitionSpec(None, "model")
    lora_a = model.layers.mlp.gate_proj.lora.lora_a.get_value()
    assert lora_a.sharding.is_fully_replicated
    assert model.layers.self_attn.q_proj.bias.get_value().sharding.is_fully_replicated

    batch = NamedSharding(mesh, PartitionSpec("clients"))
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(
        state, jax.device_put(jnp.asarray(ids), batch), jax.device_put(jnp.asarray(mask), batch)
    )
    assert out.sharding.spec[0] == "clients"
    valid = mask.astype(bool)
    assert np.abs(np.asarray(out) - ref)[valid].max() < 1e-5

    # Reloading weights keeps the placement.
    load_hf_state_dict(model, tiny.torch_state_dict(tiny.torch_model(HF, seed=4)))
    kernel = model.layers.mlp.gate_proj.kernel.get_value()
    assert kernel.sharding.spec == PartitionSpec(None, "model", None)


def test_unit_mesh_is_a_no_op():
    model = _model()
    shardings = model_shardings(model, make_mesh(1, 1))
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, shardings))
    assert all(all(a in (None, "model") for a in spec) for spec in specs)
    ids, mask = tiny.left_padded_batch(128, [5, 2], 5)
    ref = tiny.logits(model, ids, mask)
    shard_model(model, make_mesh(1, 1))
    np.testing.assert_array_equal(tiny.logits(model, ids, mask), ref)


def test_logical_to_spec_rules():
    mesh = make_mesh(clients=1, model=4)
    spec = logical_to_spec(("layers", "embed", "mlp"), (2, 64, 96), mesh)
    assert spec == PartitionSpec(None, "model", None)
    # 9 heads' worth of embed does not split 4 ways: replicate rather than fail.
    assert logical_to_spec(("embed",), (9,), mesh) == PartitionSpec(None)
    # A mesh axis is used once per array.
    rules = (*LOGICAL_AXIS_RULES, ("twice", "model"))
    assert logical_to_spec(("embed", "twice"), (8, 8), mesh, rules) == PartitionSpec("model", None)
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("heads",), (8,), mesh)
    with pytest.raises(ValueError, match="devices"):
        make_mesh(clients=4, model=4)


@pytest.mark.parametrize(
    ("clients", "model", "per_round", "devices", "want"),
    [
        ("auto", 1, 4, 8, (4, 1)),  # the clients axis divides the round's clients
        ("auto", 1, 3, 8, (3, 1)),
        ("auto", 1, 16, 8, (8, 1)),
        ("auto", 2, 4, 8, (4, 2)),
        ("auto", 4, 6, 8, (2, 4)),
        ("auto", "auto", 3, 8, (3, 2)),  # auto model takes the devices left
        (2, "auto", 4, 8, (2, 4)),
        (1, 8, 4, 8, (1, 8)),
        (2, 2, 4, 8, (2, 2)),  # fewer devices than available is allowed
    ],
)
def test_mesh_shape_resolves_auto(clients, model, per_round, devices, want):
    assert mesh_shape(clients, model, per_round, devices) == want


@pytest.mark.parametrize(
    ("clients", "model", "field", "words"),
    [
        (3, 1, "clients", "3 does not divide fl.clients_per_round = 4"),
        (4, 4, "clients", "needs 16 devices, 8 available"),
        ("auto", 16, "model", "16 is more than the 8 devices"),
        (0, 1, "clients", "positive integer, got 0"),
        ("x", 1, "clients", "'x'"),
        (1, True, "model", "got True"),
    ],
)
def test_mesh_problems_name_the_field(clients, model, field, words):
    assert mesh_problem(clients, model, 4, 8)[0] == field
    with pytest.raises(ValueError, match=f"^fl.mesh.{field}: .*{re.escape(words)}"):
        mesh_shape(clients, model, 4, 8)


def test_shard_state_and_device_bytes():
    model = _model()
    _, lora, base = split_lora(model)
    mesh = make_mesh(clients=1, model=4)
    placed = shard_state(base, mesh)
    total = sum(x.nbytes for x in jax.tree.leaves(base))
    assert device_bytes(base, jax.devices()[0]) == total
    # Only the norm scales (and dimensions 4 does not divide) stay whole on every device.
    assert device_bytes(placed, jax.devices()[0]) <= total / 4 * 1.05
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(placed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for leaf in jax.tree.leaves(replicate(lora, mesh)):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4


def test_shard_rows_splits_rows_over_the_clients_axis_under_a_mesh():
    x = jnp.arange(16.0).reshape(8, 2)
    f = jax.jit(lambda x: shard_rows(x) * 2)
    assert f(x).sharding.is_fully_replicated or len(f(x).sharding.device_set) == 1
    mesh = make_mesh(clients=4, model=1)
    assert padded_rows(3) == 3
    with jax.set_mesh(mesh):
        assert row_multiple() == 4
        assert [padded_rows(n) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
        out = jax.jit(lambda x: shard_rows(x) * 2)(x)
        assert out.sharding.spec[0] == "clients"
        # 6 rows do not split 4 ways: left to XLA.
        odd = jax.jit(lambda x: shard_rows(x) * 2)(x[:6])
        assert odd.sharding.spec in (PartitionSpec(), PartitionSpec(None, None))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)
    assert row_multiple() == 1
