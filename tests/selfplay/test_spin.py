"""SPIN: gold responses against the round-start policy's own samples, the round-start
policy as the reference, opponent data of the last two iterations (client side)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

import fedsp
from fedsp.checkpoint import client_state_path, load_client_state, save_client_state
from fedsp.data import BinaryVerdict
from fedsp.selfplay import RoundContext, get_algorithm, packing, rollout
from fedsp.selfplay.spin import Spin
from tests.federated import fixtures
from tests.selfplay.conftest import make_config
from tests.selfplay.fixed import (
    FixedReplies,
    client,
    leaves,
    pair_loss,
    perturbed,
    sequence_logps,
)
from tests.selfplay.scripted import example


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _completion(tok, seqs, c, s):
    mask = np.asarray(seqs.loss_mask[c, s]) > 0
    return tok.decode(np.asarray(seqs.tokens[c, s])[mask])


def test_pairs_gold_against_own_sample_scored_by_round_start_policy(policy, split_model, task):
    tok = policy.tokenizer
    graphdef, lora, base = split_model
    gen = FixedReplies(tok, {"What is p-A?": "Answer: 5", "What is p-B?": "Answer: 7"})
    algo = Spin("spin", make_config(), generate_fn=gen)
    clients = [[example("What is p-A?", "4")], [example("What is p-B?", "7")]]
    batch, metrics = algo.collect(
        policy, lora, clients, task, BinaryVerdict(task), jax.random.key(0), 1
    )
    assert gen.calls == 1  # one batched generation for every client
    end = packing.end_of_turn_id(tok)
    prompt = rollout.prompt_ids(tok, task, clients[0][0])
    gold, neg = [*tok.encode("Answer: 4"), end], [*tok.encode("Answer: 5"), end]
    np.testing.assert_array_equal(
        batch.train.tokens[0, 0, : len(prompt) + len(gold)], prompt + gold
    )
    np.testing.assert_array_equal(batch.lose.tokens[0, 0, : len(prompt) + len(neg)], prompt + neg)
    np.testing.assert_array_equal(
        np.flatnonzero(batch.lose.loss_mask[0, 0]), np.arange(len(prompt), len(prompt) + len(neg))
    )
    assert batch.train.tokens.shape == batch.lose.tokens.shape
    np.testing.assert_array_equal(batch.num_examples, [1, 1])
    np.testing.assert_array_equal(batch.wins, [0, 1])  # "Answer: 7" is right for p-B
    assert metrics["rollout/accuracy"] == 0.5

    # The opponent / reference is the round-start policy, scored once (J = 1).
    s = batch.train.tokens.shape[1]
    assert batch.players.pos.shape == (2, 1, s) and batch.players.mask.shape == (2, 1)
    for got, seqs in ((batch.players.pos, batch.train), (batch.players.neg, batch.lose)):
        np.testing.assert_allclose(
            np.asarray(got)[:, 0], sequence_logps(graphdef, lora, base, seqs), rtol=1e-5, atol=1e-4
        )
    # At the round start the policy is its own opponent: rewards 0, loss log 2.
    _, m = pair_loss(algo, graphdef, base, lora, client(batch), jax.random.key(1))
    assert float(m["loss"]) == pytest.approx(math.log(2.0), abs=1e-5)
    assert abs(float(m["margin"])) < 1e-4

    new, stats = algo.local_train(graphdef, base, lora, client(batch), jax.random.key(2))
    assert float(stats["trained"]) == 1.0 and float(stats["num_examples"]) == 1.0
    _, after = pair_loss(algo, graphdef, base, new, client(batch), jax.random.key(1))
    assert float(after["margin"]) > 0.0 and float(after["loss"]) < math.log(2.0)


def test_opponent_data_of_the_last_two_iterations_is_client_state(
    policy, split_model, task, tmp_path
):
    tok = policy.tokenizer
    graphdef, lora, base = split_model
    replies = {
        "What is h-A?": ["Answer: 1", "Answer: 2", "Answer: 3"],
        "What is h-B?": ["Answer: 6", "Answer: 7", "Answer: 8"],
    }
    ex_a, ex_b = example("What is h-A?", "9"), example("What is h-B?", "9")
    algo = Spin("spin", make_config(), generate_fn=FixedReplies(tok, replies))
    ctx = lambda ids: RoundContext(clients=np.asarray(ids))  # noqa: E731
    key = jax.random.key(0)
    fb = BinaryVerdict(task)
    b1, _ = algo.collect(policy, lora, [[ex_a], [ex_b]], task, fb, key, 1, context=ctx([5, 2]))
    np.testing.assert_array_equal(b1.num_examples, [1, 1])
    # Round 2 samples the clients in the other order: history follows the global ids.
    lora2 = perturbed(lora, 1)
    b2, m2 = algo.collect(policy, lora2, [[ex_b], [ex_a]], task, fb, key, 2, context=ctx([2, 5]))
    np.testing.assert_array_equal(b2.num_examples, [2, 2])
    assert m2["pairs/opponent_history"] == 2.0
    assert [_completion(tok, b2.lose, 0, s) for s in (0, 1)] == ["Answer: 7", "Answer: 6"]
    assert [_completion(tok, b2.lose, 1, s) for s in (0, 1)] == ["Answer: 2", "Answer: 1"]
    assert _completion(tok, b2.train, 1, 1) == "Answer: 9"
    # The round-1 pair is scored again under round 2's opponent.
    np.testing.assert_allclose(
        np.asarray(b2.players.neg)[:, 0],
        sequence_logps(graphdef, lora2, base, b2.lose),
        rtol=1e-5,
        atol=1e-4,
    )
    assert not np.allclose(b2.players.neg[1, 0, 1], b1.players.neg[0, 0, 0])

    # Resumable: the state survives a save/load into a fresh algorithm object.
    save_client_state(tmp_path, 2, algo.client_state())
    fresh = Spin(
        "spin",
        make_config(),
        generate_fn=FixedReplies(
            tok, {"What is h-A?": ["Answer: 3"], "What is h-B?": ["Answer: 8"]}
        ),
    )
    fresh.load_client_state(load_client_state(tmp_path, 2))
    b3, _ = algo.collect(policy, lora2, [[ex_a], [ex_b]], task, fb, key, 3, context=ctx([5, 2]))
    b3_fresh, _ = fresh.collect(
        policy, lora2, [[ex_a], [ex_b]], task, fb, key, 3, context=ctx([5, 2])
    )
    for a, b in zip(leaves(b3), leaves(b3_fresh)):
        np.testing.assert_array_equal(a, b)
    # D_3 ∪ D_2: round 1's sample has left.
    assert [_completion(tok, b3.lose, 0, s) for s in (0, 1)] == ["Answer: 3", "Answer: 2"]
    client_state_path(tmp_path, 2).write_bytes(b"not an npz")
    with pytest.raises(Exception, match=r"client state of round 2 .*round_000002.npz"):
        load_client_state(tmp_path, 2)


def test_one_federated_round_through_the_loop(model_dir, tmp_path):
    # The vmap backend (drjax over 4 simulated devices): ClientBatch.players is stacked
    # and sharded over the client axis like the rest of the batch.
    config = fixtures.tiny_config(
        model_dir,
        fl__rounds=1,
        fl__clients_per_round=4,
        fl__backend="vmap",
        algorithm__name="spin",
        rollout__prompts_per_client=2,
        rollout__max_new_tokens=4,
        data__limit=16,
        local__steps=2,
        local__batch_size=2,
        local__max_len=96,
    )
    summary = fedsp.run(config, tmp_path / "run")
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    record = history[1]
    assert summary["rounds"] == 1 and len(record["clients"]) == 4
    assert np.isfinite(record["loss"]) and record["client/num_examples"] == 2.0
    assert record["collect/players/count"] == 1.0
    # Client-side opponent data is stored beside the run checkpoint, not inside it.
    state = load_client_state(tmp_path / "run" / "client_state", 1)
    assert sorted(set(state["client"].tolist())) == sorted(record["clients"])
    assert get_algorithm("spin", config).hp.opponent_rounds == 2
