"""DPO: a frozen round-0 reference; (gold, wrong own sample) or given preference pairs."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import fedsp
from fedsp.data import BinaryVerdict
from fedsp.data.base import Example
from fedsp.selfplay import RoundContext, get_algorithm
from fedsp.selfplay.dpo import Dpo
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


def test_reference_is_frozen_and_correct_samples_are_not_rejected(policy, split_model, task):
    tok = policy.tokenizer
    graphdef, reference, base = split_model
    round_start = perturbed(reference, 3, 0.2)  # the policy has moved since round 0
    gen = FixedReplies(tok, {"What is d-A?": "Answer: 5", "What is d-B?": "Answer: 7"})
    algo = Dpo("dpo", make_config(**{"algorithm.beta": 0.2}), generate_fn=gen)
    clients = [[example("What is d-A?", "4")], [example("What is d-B?", "7")]]
    context = RoundContext(clients=np.arange(2), reference=reference)
    batch, metrics = algo.collect(
        policy,
        round_start,
        clients,
        task,
        BinaryVerdict(task),
        jax.random.key(0),
        4,
        context=context,
    )
    # d-B's sample is right: no preference pair; d-A: (gold, wrong sample).
    np.testing.assert_array_equal(batch.num_examples, [1, 0])
    np.testing.assert_array_equal(batch.train.valid[:, 0], [True, False])
    np.testing.assert_allclose(
        np.asarray(batch.players.pos)[:, 0],
        sequence_logps(graphdef, reference, base, batch.train),
        rtol=1e-5,
        atol=1e-4,
    )
    assert not np.allclose(
        np.asarray(batch.players.pos)[0, 0],
        sequence_logps(graphdef, round_start, base, batch.train)[0, 0],
    )
    assert metrics["pairs/opponent_history"] == 0.0 and algo.hp.opponent_rounds == 1
    # Against the reference itself DPO starts at log 2; a client without pairs sends
    # its round-start adapter back with weight 0.
    _, m = pair_loss(algo, graphdef, base, reference, client(batch), jax.random.key(1))
    assert float(m["loss"]) == pytest.approx(np.log(2.0), abs=1e-5)
    new, stats = algo.local_train(graphdef, base, round_start, client(batch, 1), jax.random.key(2))
    assert float(stats["trained"]) == 0.0 and float(stats["num_examples"]) == 0.0
    for a, b in zip(leaves(new), leaves(round_start)):
        np.testing.assert_array_equal(a, b)


def test_given_preference_pairs_need_no_generation(policy, split_model, task):
    tok = policy.tokenizer
    _, reference, _ = split_model
    gen = FixedReplies(tok, {})
    algo = Dpo("dpo", make_config(), generate_fn=gen)
    pref = Example(
        uid="p",
        question="What is g-A?",
        answer="4",
        label="add",
        meta={"chosen": "2 + 2 = 4. Answer: 4", "rejected": "Answer: 5"},
    )
    batch, _ = algo.collect(
        policy,
        reference,
        [[pref]],
        task,
        BinaryVerdict(task),
        jax.random.key(0),
        1,
        context=RoundContext(clients=np.arange(1), reference=reference),
    )
    assert gen.calls == 0

    def done(seqs):
        return tok.decode(np.asarray(seqs.tokens[0, 0])[np.asarray(seqs.loss_mask[0, 0]) > 0])

    assert done(batch.train) == "2 + 2 = 4. Answer: 4" and done(batch.lose) == "Answer: 5"
    with pytest.raises(ValueError, match=r"DPO needs its frozen reference.*context"):
        algo.collect(policy, reference, [[pref]], task, BinaryVerdict(task), jax.random.key(0), 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def test_one_federated_round_through_the_loop(model_dir, tmp_path):
    config = fixtures.tiny_config(
        model_dir,
        fl__rounds=1,
        fl__clients_per_round=2,
        algorithm__name="dpo",
        rollout__prompts_per_client=2,
        rollout__max_new_tokens=4,
        data__limit=16,
        local__steps=2,
        local__batch_size=2,
        local__max_len=96,
    )
    summary = fedsp.run(config, tmp_path / "run")
    record = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][
        1
    ]
    assert summary["rounds"] == 1 and np.isfinite(record["loss"])
    # The tiny random model never solves arithmetic: every sample is a rejected answer.
    assert record["client/num_examples"] == 2.0 and record["collect/players/count"] == 1.0
    assert not (tmp_path / "run" / "pool").exists()  # the reference is round 0, no pool
    assert isinstance(get_algorithm("dpo", config), Dpo)
