"""GRPO and SFT client baselines on scripted generations and gold answers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedsp.data import BinaryVerdict
from fedsp.selfplay import get_algorithm, packing, rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.grpo import Grpo
from tests.selfplay.conftest import make_config
from tests.selfplay.scripted import Scripted, example

SCRIPT = {"What is g-A?": ["Answer: 3", "Answer: 4"], "What is g-B?": ["Answer: 1", "Answer: 2"]}


def test_grpo_group_advantages_and_round_start_ratio(policy, split_model, task):
    scripted = Scripted(policy.tokenizer, SCRIPT, revisions=False)
    algo = Grpo("grpo", make_config(), generate_fn=scripted)
    clients = [[example("What is g-A?", "4")], [example("What is g-B?", "9")]]
    batch, metrics = algo.collect(
        policy, split_model[1], clients, task, BinaryVerdict(task), jax.random.key(0), 1
    )
    # G = 2 samples per prompt: rewards [0, 1] → normalised advantages ∓1/√2 (ddof 1);
    # [0, 0] → 0.
    valid = np.asarray(batch.train.valid)
    np.testing.assert_allclose(
        np.asarray(batch.train.weight)[0][valid[0]],
        [-0.5 / np.sqrt(0.5), 0.5 / np.sqrt(0.5)],
        rtol=1e-5,
    )
    np.testing.assert_array_equal(np.asarray(batch.train.weight)[1][valid[1]], [0.0, 0.0])
    np.testing.assert_array_equal(batch.num_examples, [2, 2])
    assert metrics["rollout/accuracy"] == 0.25
    graphdef, lora, base = split_model
    # Jitted: eagerly, the model's ops compile one by one (≈ 8 s more here).
    loss_fn = jax.jit(
        lambda ctx_arrays, *args: Grpo.minibatch_loss(
            tr.LossContext(graphdef, algo.static_hparams(), *ctx_arrays), *args
        )
    )
    _, m = loss_fn((base, lora), lora, jax.tree.map(lambda x: x[0], batch), jax.random.key(1))
    # At the round start the policy is the old and the reference policy.
    assert float(m["ratio"]) == pytest.approx(1.0, abs=1e-5)
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["clip_frac"]) == 0.0 and float(m["num_sequences"]) == 2.0


def test_sft_trains_on_gold_answer_lines(policy, split_model, task):
    algo = get_algorithm("sft", make_config())
    clients = [[example("What is s-A?", "12"), example("What is s-B?", "7")]]
    batch, _ = algo.collect(
        policy, split_model[1], clients, task, BinaryVerdict(task), jax.random.key(0), 1
    )
    tok = policy.tokenizer
    gold = [*tok.encode("Answer: 12"), packing.end_of_turn_id(tok)]
    prompt = rollout.prompt_ids(tok, task, clients[0][0])
    n = len(prompt) + len(gold)
    np.testing.assert_array_equal(batch.train.tokens[0, 0, :n], prompt + gold)
    np.testing.assert_array_equal(
        np.flatnonzero(batch.train.loss_mask[0, 0]), np.arange(len(prompt), n)
    )
    np.testing.assert_array_equal(batch.num_examples, [2])  # C = 1 (centralized) works
    graphdef, lora, base = split_model
    client = jax.tree.map(lambda x: x[0], batch)
    new, stats = algo.local_train(graphdef, base, lora, client, jax.random.key(1))
    _, again = algo.local_train(graphdef, base, new, client, jax.random.key(2))
    assert float(again["loss"]) < float(stats["loss"])
    assert float(stats["mean_advantage"]) == 0.0 and np.isnan(float(stats["baseline"]))
    assert packing.gold_completion(task, example("q", "5")) == "Answer: 5"
