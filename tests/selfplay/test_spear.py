"""SPEAR / feedback-SFT: trace rules on scripted generations, packing, local training."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedsp import config as config_lib
from fedsp.data import Hint
from fedsp.federated.mapping import map_clients
from fedsp.selfplay import get_algorithm, packing, rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.hparams import DEFAULT_PROTECTED_STRINGS, round_lr_schedule
from fedsp.selfplay.spear import Spear, cap_loses
from tests.selfplay.conftest import make_config
from tests.selfplay.scripted import Scripted, example

# client 0: A right at once; B fixed by revision 1; C never fixed.
# client 1: D fixed by revision 2; E never fixed.
SCRIPT = {
    "What is q-A?": ["Answer: 4"],
    "What is q-B?": ["Answer: 1", "Answer: 5"],
    "What is q-C?": ["Answer: 1", "Answer: 2", "Answer: 3"],
    "What is q-D?": ["Answer: 1", "Answer: 2", "Answer: 6"],
    "What is q-E?": ["Answer: 1", "Answer: 2", "Answer: 3"],
}
GOLD = {"A": "4", "B": "5", "C": "9", "D": "6", "E": "8"}
CLIENTS = [["A", "B", "C"], ["D", "E"]]


def _examples(clients=CLIENTS):
    return [[example(f"What is q-{k}?", GOLD[k]) for k in ks] for ks in clients]


def _collect(
    policy,
    split_model,
    task,
    script=SCRIPT,
    clients=CLIENTS,
    name="spear",
    baselines=None,
    **overrides,
):
    algo = Spear(name, make_config(**overrides), generate_fn=Scripted(policy.tokenizer, script))
    batch, metrics = algo.collect(
        policy,
        split_model[1],
        _examples(clients),
        task,
        Hint(task),
        jax.random.key(0),
        1,
        baselines=baselines,
    )
    return algo, batch, metrics


def _rows(seqs, c):
    """The valid rows of client c as (token list, loss-mask positions, weight)."""
    out = []
    for s in np.flatnonzero(np.asarray(seqs.valid[c])):
        n = int(np.asarray(seqs.attention_mask[c, s]).sum())
        out.append(
            (
                np.asarray(seqs.tokens[c, s, :n]).tolist(),
                np.flatnonzero(np.asarray(seqs.loss_mask[c, s])).tolist(),
                float(seqs.weight[c, s]),
            )
        )
    return out


def test_trace_rules_wins_loses_confidence(policy, split_model, task):
    algo, batch, metrics = _collect(policy, split_model, task)
    tok = policy.tokenizer
    end = packing.end_of_turn_id(tok)

    def row(key, reply):
        prompt = rollout.prompt_ids(tok, task, example(f"What is q-{key}?", GOLD[key]))
        completion = [*tok.encode(reply), end]
        return prompt + completion, list(range(len(prompt), len(prompt) + len(completion)))

    # Wins: correct y0 first, then successful revisions, each on the ORIGINAL prompt.
    wins0 = [row("A", "Answer: 4"), row("B", "Answer: 5")]
    wins1 = [row("D", "Answer: 6")]
    assert [(t, m) for t, m, _ in _rows(batch.train, 0)] == wins0
    assert [(t, m) for t, m, _ in _rows(batch.train, 1)] == wins1
    # Loses: the wrong y0, confidence 1.0 when a revision succeeded, else 0.5.
    loses0 = _rows(batch.lose, 0)
    assert [(t, w) for t, _, w in loses0] == [
        (row("B", "Answer: 1")[0], 1.0),
        (row("C", "Answer: 1")[0], 0.5),
    ]
    assert [w for *_, w in _rows(batch.lose, 1)] == [1.0, 0.5]
    np.testing.assert_array_equal(batch.wins, [2, 1])
    np.testing.assert_array_equal(batch.wrong, [2, 2])
    np.testing.assert_array_equal(batch.num_examples, [2, 1])
    # 5 first answers, 4 first revisions (B, C, D, E), 3 second revisions (C, D, E).
    assert metrics["rollout/generated"] == 12
    assert sorted((q[-2], a) for q, a, _ in algo.generate_fn.calls if a > 0) == [
        ("B", 1),
        ("C", 1),
        ("C", 2),
        ("D", 1),
        ("D", 2),
        ("E", 1),
        ("E", 2),
    ]
    # A revision prompt holds the latest attempt and its feedback, never the gold.
    (d2,) = [text for q, a, text in algo.generate_fn.calls if q.endswith("D?") and a == 2]
    assert "Answer: 2" in d2 and "Answer: 1" not in d2 and "too low" in d2
    assert "6" not in d2.split("q-D?")[1].replace("Answer: 2", "")


def test_unlikelihood_mask_is_tail_without_eos_and_protected(policy, split_model, task):
    _, batch, _ = _collect(policy, split_model, task, **{"algorithm.tail_tokens": 2})
    tok = policy.tokenizer
    protected = set(packing.protected_token_ids(tok, DEFAULT_PROTECTED_STRINGS))
    for tokens, positions, _ in _rows(batch.lose, 0):
        completion = tok.encode("Answer: 1")
        n_prompt = len(tokens) - len(completion) - 1
        tail = [n_prompt + i for i in range(len(completion))][-2:]
        assert positions == [p for p in tail if tokens[p] not in protected]
        assert positions and all(tokens[p] not in tok.eos_token_ids for p in positions)


def test_advantages_and_baselines(policy, split_model, task):
    _, batch, _ = _collect(policy, split_model, task, baselines=[0.5, np.nan])
    # Client 0: first-answer rewards [1, 0, 0] against baseline 0.5; client 1: [0, 0] and
    # no baseline yet, so its own mean (0) is the reference and the EMA starts there.
    np.testing.assert_allclose(batch.mean_advantage, [1 / 3 - 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(batch.baseline, [0.9 * 0.5 + 0.1 / 3, 0.0], rtol=1e-6)


def test_awr_weights_on_wins(policy, split_model, task):
    _, batch, _ = _collect(
        policy,
        split_model,
        task,
        baselines=[0.5, 0.25],
        **{"algorithm.awr_temperature": 0.5, "algorithm.awr_max_weight": 2.0},
    )
    # Win rewards are 1; w = min(exp((1 − b) / 0.5), 2).
    assert [w for *_, w in _rows(batch.train, 0)] == pytest.approx([2.0, 2.0])
    assert [w for *_, w in _rows(batch.train, 1)] == pytest.approx([min(math.exp(1.5), 2.0)])
    _, batch, _ = _collect(
        policy, split_model, task, baselines=[0.9, 0.9], **{"algorithm.awr_temperature": 0.5}
    )
    assert [w for *_, w in _rows(batch.train, 0)] == pytest.approx([math.exp(0.2)] * 2, rel=1e-6)


def test_rho_caps_loses(policy, split_model, task):
    _, batch, metrics = _collect(policy, split_model, task, **{"algorithm.rho": 0.5})
    # ⌊0.5 · 2⌋ = 1 lose kept for client 0, ⌊0.5 · 1⌋ = 0 for client 1.
    np.testing.assert_array_equal(np.asarray(batch.lose.valid).sum(1), [1, 0])
    np.testing.assert_array_equal(batch.wrong, [2, 2])
    assert metrics["rollout/loses_kept"] == 1
    rng = np.random.default_rng(0)
    assert cap_loses(3, 2, 2.0, rng).tolist() == [0, 1, 2]
    kept = cap_loses(10, 3, 1.5, rng)
    assert len(kept) == 4 and len(set(kept.tolist())) == 4 and list(kept) == sorted(kept)
    assert cap_loses(4, 0, 2.0, rng).tolist() == []


def test_pack_masks_and_truncation():
    eos, ans = 99, 50
    seqs = packing.pack(
        [
            [packing.Trace([1, 2, 3], [4, 5, eos])],
            [packing.Trace([1, 2], [7, ans, 8, 9, eos], 0.5, True)],
        ],
        max_len=16,
        pad_id=0,
        end_ids=[eos],
        protected_ids=[ans],
        tail_tokens=3,
    )
    assert seqs.tokens.shape == (2, 8, 8)
    np.testing.assert_array_equal(seqs.tokens[0, 0], [1, 2, 3, 4, 5, eos, 0, 0])
    np.testing.assert_array_equal(seqs.loss_mask[0, 0], [0, 0, 0, 1, 1, 1, 0, 0])
    # Tail of 3 among the non-EOS completion tokens [7, ans, 8, 9] is [ans, 8, 9];
    # the protected ans is then dropped.
    np.testing.assert_array_equal(seqs.loss_mask[1, 0], [0, 0, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(seqs.attention_mask[1, 0], [1] * 7 + [0])
    np.testing.assert_array_equal(seqs.valid[:, :2], [[True, False], [True, False]])
    np.testing.assert_array_equal(seqs.weight[:, 0], [1.0, 0.5])
    short = packing.pack([[packing.Trace([1, 2, 3], [4, 5])]], max_len=4, pad_id=0)
    np.testing.assert_array_equal(short.tokens[0, 0], [2, 3, 4, 5])
    np.testing.assert_array_equal(short.loss_mask[0, 0], [0, 0, 1, 1])


def test_no_wins_returns_the_identical_adapter(policy, split_model, task):
    all_wrong = {q: ["Answer: 1"] * 3 for q in SCRIPT}
    _, batch, _ = _collect(policy, split_model, task, script=all_wrong)
    np.testing.assert_array_equal(batch.num_examples, [0, 0])
    assert not np.asarray(batch.train.valid).any()
    # Same shapes as the other tests' batch (one compiled step): client 0 without wins.
    algo, batch, _ = _collect(policy, split_model, task)
    client = jax.tree.map(lambda x: x[0], batch)
    client = dataclasses.replace(
        client, train=dataclasses.replace(client.train, valid=jnp.zeros_like(client.train.valid))
    )
    graphdef, lora, base = split_model
    new, stats = algo.local_train(graphdef, base, lora, client, jax.random.key(1))
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(lora)):
        np.testing.assert_array_equal(x, y)
    assert float(stats["num_examples"]) == 0.0 and float(stats["trained"]) == 0.0
    assert float(stats["loss"]) == 0.0 and float(stats["wrong"]) == 2.0


def test_local_train_reduces_the_loss(policy, split_model, task):
    algo, batch, _ = _collect(policy, split_model, task)
    graphdef, lora, base = split_model
    batch0 = jax.tree.map(lambda x: x[0], batch)  # 2 wins, 2 loses: every minibatch = all
    new, stats = algo.local_train(graphdef, base, lora, batch0, jax.random.key(1))
    _, stats_again = algo.local_train(graphdef, base, new, batch0, jax.random.key(2))
    # stats["loss"] is the mean loss over the local steps, each before its update.
    assert float(stats_again["loss"]) < float(stats["loss"]) - 0.05
    assert float(stats["lose_tokens"]) > 0 and float(stats["ul_loss"]) >= 0
    assert float(stats["num_examples"]) == 2.0 and float(stats["trained"]) == 1.0


def test_feedback_sft_has_no_lose_term(policy, split_model, task):
    algo, batch, _ = _collect(policy, split_model, task, name="feedback_sft")
    assert not algo.use_lose and not np.asarray(batch.lose.valid).any()
    np.testing.assert_array_equal(batch.wins, [2, 1])
    graphdef, lora, base = split_model
    ctx = tr.LossContext(graphdef, algo.static_hparams(), base, lora)
    _, metrics = Spear.minibatch_loss(
        ctx, lora, jax.tree.map(lambda x: x[0], batch), jax.random.key(3)
    )
    assert float(metrics["ul_loss"]) == 0.0 and float(metrics["lose_tokens"]) == 0.0
    assert float(metrics["loss"]) == pytest.approx(float(metrics["sft_loss"]))


def _check_map_clients(backend, policy, split_model, task):
    algo, batch, _ = _collect(policy, split_model, task)
    graphdef, lora, base = split_model
    keys = jax.random.split(jax.random.key(5), 2)
    mapped = map_clients(
        functools.partial(algo.local_train, graphdef), backend, in_axes=(None, None, 0, 0)
    )
    adapters, stats = mapped(base, lora, batch, keys)
    alone = [
        algo.local_train(graphdef, base, lora, jax.tree.map(operator.itemgetter(c), batch), keys[c])
        for c in range(2)
    ]
    for c in range(2):
        for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(alone[c][0])):
            np.testing.assert_allclose(a[c], b, rtol=2e-4, atol=2e-6)
    np.testing.assert_array_equal(stats["num_examples"], [2, 1])
    # Distinct arrays: the clients' updates differ from each other and from the start.
    diffs = [float(jnp.max(jnp.abs(a[0] - a[1]))) for a in jax.tree.leaves(adapters)]
    moved = [
        float(jnp.max(jnp.abs(a[0] - b)))
        for a, b in zip(jax.tree.leaves(adapters), jax.tree.leaves(lora))
    ]
    assert max(diffs) > 1e-6 and max(moved) > 1e-6


def test_map_clients_loop_gives_each_client_its_own_result(policy, split_model, task):
    _check_map_clients("loop", policy, split_model, task)


@pytest.mark.slow
def test_map_clients_vmap_gives_each_client_its_own_result(policy, split_model, task):
    _check_map_clients("vmap", policy, split_model, task)


def test_round_lr_schedule_matches_the_reference():
    def reference(r, total, peak, low, ratio):  # lee3296/SPEAR spear.py `_cosine_lr`
        w = int(ratio * total)
        if r <= w:
            return peak * r / max(1, w)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * (r - w) / max(1, total - w)))

    for ratio in (0.1, 0.0):
        schedule = round_lr_schedule(100, 5e-5, 1e-5, ratio)
        for r in (1, 5, 10, 11, 37, 99, 100):
            assert float(schedule(r)) == pytest.approx(
                reference(r, 100, 5e-5, 1e-5, ratio), rel=1e-5
            )


def test_bad_names_and_fields_raise():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo'"):
        get_algorithm("ppo", make_config())
    # Fields are checked in one place, the config's validation.
    with pytest.raises(ValueError, match=r"algorithm\.margin"):
        config_lib.validate(make_config(**{"algorithm.margin": 1.5}))
    with pytest.raises(ValueError, match=r"local\.steps"):
        config_lib.validate(make_config(**{"local.steps": 0}))
    assert get_algorithm("feedback_sft", make_config()).use_lose is False


@pytest.mark.parametrize("reuse", [True, False])
def test_revisions_ask_the_sampler_to_reuse_the_first_answers(policy, split_model, task, reuse):
    algo, _, _ = _collect(policy, split_model, task, **{"rollout.reuse_cache": reuse})
    first, *revisions = algo.generate_fn.options
    assert first == {"keep_cache": reuse, "continue_from": None}
    assert len(revisions) == 2 and all(not o["keep_cache"] for o in revisions)
    # Each revision continues from the first answers of the rows it re-generates.
    assert [o["continue_from"] is not None for o in revisions] == [reuse, reuse]
    if reuse:
        assert [len(o["continue_from"]) for o in revisions] == [4, 3]
