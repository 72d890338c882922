"""Memory levers: per-layer remat policies (``model.remat``) and gradient accumulation
(``local.micro_batch_size``) change what is kept, not the losses, gradients or adapters."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fedsp
from fedsp.config import validate
from fedsp.model.config import ModelConfig
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.transformer import REMAT_POLICIES, Transformer
from fedsp.selfplay import PlayerLogps, get_algorithm
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import client_batch
from fedsp.selfplay.packing import Trace, pack
from tests.federated import fixtures
from tests.model import tiny
from tests.selfplay.conftest import make_config

VOCAB = 128
BATCH = 4  # local.batch_size
TIGHT = dict(rtol=1e-5, atol=1e-6)


@functools.cache
def split_model(remat: str = "none"):
    """A tiny Llama with LoRA (B ≠ 0, so adapters matter), split; the same weights for
    every policy."""
    model = Transformer(
        ModelConfig.from_hf(tiny.tiny_hf_config("llama")), rngs=nnx.Rngs(0), remat=remat
    )
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    graphdef, lora, base = split_lora(model)
    rng = np.random.default_rng(7)
    lora = jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + np.float32(0.05) * rng.standard_normal(x.shape)),
        lora,
    )
    return graphdef, lora, base


def traces(seed: int, count: int, *, weights=None, tail_only=False) -> list[Trace]:
    """``count`` random traces of different prompt and completion lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = rng.integers(3, VOCAB, int(rng.integers(3, 12))).tolist()
        completion = rng.integers(3, VOCAB, int(rng.integers(2, 10))).tolist()
        weight = 1.0 if weights is None else float(weights[i])
        out.append(Trace(prompt, completion, weight, tail_only=tail_only))
    return out


def one_client(batch):
    return jax.tree.map(lambda x: x[0], batch)


def spear_batch(num_wins: int = 6, num_loses: int = 5):
    win = pack([traces(1, num_wins, weights=np.linspace(0.5, 2.0, num_wins))], 32, 0)
    lose = pack(
        [traces(2, num_loses, weights=np.linspace(0.5, 1.0, num_loses), tail_only=True)],
        32,
        0,
        tail_tokens=4,
    )
    batch = client_batch(win, lose=lose, lr=5e-3, num_examples=[num_wins], baseline=[0.0], wins=[6])
    return one_client(batch)


def grpo_batch(rows: int = 6):
    advantages = np.random.default_rng(3).standard_normal(rows)
    train = pack([traces(4, rows, weights=advantages)], 32, 0)
    return one_client(client_batch(train, lr=5e-3, num_examples=[rows], baseline=[0.0], wins=[3]))


def pair_batch(num_players: int, pairs: int = 5):
    pos = pack([traces(5, pairs)], 32, 0)
    neg = pack([traces(6, pairs)], 32, 0, min_rows=pos.tokens.shape[1])
    s = pos.tokens.shape[1]
    rng = np.random.default_rng(8)
    mask = np.arange(num_players) < max(1, num_players - 1)  # a pool that is not full yet
    players = PlayerLogps(
        pos=jnp.asarray(-20.0 + rng.standard_normal((1, num_players, s)), jnp.float32),
        neg=jnp.asarray(-20.0 + rng.standard_normal((1, num_players, s)), jnp.float32),
        mask=jnp.asarray(mask[None]),
    )
    batch = client_batch(
        pos, lose=neg, lr=5e-3, num_examples=[pairs], baseline=[0.0], wins=[0], players=players
    )
    return one_client(batch)


def algorithm(name: str, micro_batch_size: int = 0, **overrides):
    config = make_config(
        **{
            "algorithm.name": name,
            "algorithm.margin": 0.0,  # every lose token in the unlikelihood term
            "algorithm.lambda_lose": 0.5,
            "algorithm.kl_coef": 0.1,
            "local.steps": 2,
            "local.batch_size": BATCH,
            "local.micro_batch_size": micro_batch_size,
            **overrides,
        }
    )
    validate(config)
    return get_algorithm(name, config)


def batch_for(name: str):
    if name in ("spear", "feedback_sft", "sft"):
        return spear_batch()
    if name == "grpo":
        return grpo_batch()
    return pair_batch(num_players=3 if name == "tpaw" else 1)


@functools.cache
def loss_and_grad(name: str, remat: str = "none", micro_batches: int = 1):
    """Jitted: adapters -> ((``name``'s minibatch loss, metrics), adapter gradient) on
    `batch_for` ``name``, and the adapters to call it at (cached: one compile each)."""
    algo, batch_c = algorithm(name), batch_for(name)
    graphdef, lora, base = split_model(remat)
    hp = algo.static_hparams()

    def loss(lora):
        ctx = tr.LossContext(graphdef, hp, base, lora, micro_batches)
        return type(algo).minibatch_loss(ctx, lora, batch_c, jax.random.key(3))

    return jax.jit(jax.value_and_grad(loss, has_aux=True)), lora


def value_and_grad(name: str, remat: str = "none", micro_batches: int = 1):
    fn, lora = loss_and_grad(name, remat, micro_batches)
    return fn(lora)


def remat_policies(jaxpr) -> list:
    """The ``policy`` of every rematerialisation (``jax.checkpoint``) in ``jaxpr``,
    nested jaxprs (scan bodies, checkpointed functions) included."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("checkpoint", "remat2"):
                found.append(eqn.params["policy"])
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if hasattr(sub, "eqns"):
                        visit(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        visit(sub.jaxpr)

    visit(jaxpr.jaxpr)
    return found


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# --------------------------------------------------------------------------- remat


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_the_training_loss_and_lora_gradients(remat):
    (loss, metrics), grads = value_and_grad("spear")
    (loss_r, metrics_r), grads_r = value_and_grad("spear", remat)
    np.testing.assert_allclose(loss_r, loss, **TIGHT)
    assert_trees_close(metrics_r, metrics, **TIGHT)
    assert_trees_close(grads_r, grads, **TIGHT)
    assert float(metrics["ul_loss"]) > 0 and float(metrics["sft_loss"]) > 0
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


def test_remat_policies_change_the_differentiated_program():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 8)))

    def policies(remat):
        graphdef, lora, base = split_model(remat)
        loss = lambda lora: jnp.sum(nnx.merge(graphdef, lora, base)(ids) ** 2)  # noqa: E731
        return remat_policies(jax.make_jaxpr(jax.grad(loss))(lora))

    assert policies("none") == []
    assert policies("full") and all(p is None for p in policies("full"))
    dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert policies("dots") and all(p is dots for p in policies("dots"))
    assert REMAT_POLICIES == ("none", "full", "dots")


def test_init_run_applies_model_remat_to_the_training_graph(tokenizer):
    model = Transformer(ModelConfig.from_hf(tiny.tiny_hf_config("llama")), rngs=nnx.Rngs(0))
    config = fixtures.tiny_config("", model__remat="dots", fl__rounds=1)
    config.model.path = ""
    state = fedsp.init_run(
        config, model=model, tokenizer=tokenizer, algorithm=fixtures.StandInAlgorithm()
    )
    run = state.run
    assert nnx.merge(run.policy.graphdef, state.params, run.policy.base_state).remat == "dots"
    assert model.remat == "none"  # the caller's model is left as it is
    # ... and the jitted local step's forward really is rematerialised.
    algo = algorithm("sft")
    lowered = jax.make_jaxpr(
        lambda lora, base: tr.local_train(
            type(algo).minibatch_loss,
            run.policy.graphdef,
            algo.static_hparams(),
            algo.fit_hparams(algo.static_hparams()),
            base,
            lora,
            spear_batch(),
            jax.random.key(0),
        )
    )(state.params, run.policy.base_state)
    dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    assert any(p is dots for p in remat_policies(lowered))


# --------------------------------------------------------------------- accumulation


@pytest.mark.parametrize(
    "name, micro_batches",
    [
        ("spear", 2),
        ("spear", 4),
        ("spear", 3),
        ("grpo", 2),
        ("grpo", 4),
        ("tpaw", 2),
        ("tpaw", 4),
        ("dpo", 4),
    ],
)
def test_accumulated_loss_metrics_and_gradient_equal_the_full_batch(name, micro_batches):
    """One step's loss, every metric and the gradient. 3 passes do not divide SPEAR's 4
    rows: the last pass is filled with copies of the last row."""
    (loss, metrics), grads = value_and_grad(name)
    (loss_m, metrics_m), grads_m = value_and_grad(name, micro_batches=micro_batches)
    np.testing.assert_allclose(loss_m, loss, **TIGHT)
    assert_trees_close(metrics_m, metrics, **TIGHT)
    assert_trees_close(grads_m, grads, **TIGHT)
    assert float(jnp.abs(loss)) > 1e-3


@pytest.mark.parametrize("name", ["spear", "grpo", "tpaw"])
def test_local_train_with_micro_batches_gives_the_same_adapters(name):
    graphdef, lora, base = split_model("none")
    batch_c = batch_for(name)
    want, want_stats = algorithm(name).local_train(graphdef, base, lora, batch_c, jax.random.key(5))
    moved = max(
        float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(lora))
    )
    assert moved > 1e-3  # trained: the comparison is not vacuous
    for micro_batch_size in (BATCH, BATCH // 2, BATCH // 4):
        algo = algorithm(name, micro_batch_size)
        got, stats = algo.local_train(graphdef, base, lora, batch_c, jax.random.key(5))
        # Adam divides each gradient element by its own scale, so the float rounding of a
        # near-zero element can move that adapter entry by a small fraction of the lr.
        assert_trees_close(got, want, rtol=1e-5, atol=2e-5)
        assert_trees_close(stats, want_stats, rtol=1e-5, atol=1e-6)


def test_remat_and_micro_batches_lower_the_compiled_temporaries():
    def temp_bytes(remat, micro_batches=1):
        fn, lora = loss_and_grad("spear", remat, micro_batches)
        return fn.lower(lora).compile().memory_analysis().temp_size_in_bytes

    none, dots, full = temp_bytes("none"), temp_bytes("dots"), temp_bytes("full")
    assert none > dots > full
    assert temp_bytes("none", micro_batches=4) < none / 2


def test_micro_batches_need_a_divisor_of_the_batch():
    hp = algorithm("spear").hp
    assert hp.micro_batches == 1
    # One pass either way: the same jitted step.
    assert algorithm("spear", BATCH).static_hparams() == algorithm("spear").static_hparams()
    assert algorithm("spear", 1).hp.micro_batches == BATCH
    with pytest.raises(ValueError, match=r"local.micro_batch_size: 3 does not divide"):
        _ = dataclasses.replace(hp, micro_batch_size=3).micro_batches
