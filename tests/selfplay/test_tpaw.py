"""TPAW: SPIN against a team of pool checkpoints with response and player weighting;
player log-probs computed once per round; the pool as part of the loop's run state."""

from __future__ import annotations

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fedsp
from fedsp.checkpoint import CorruptCheckpointError, PlayerPool, RoundState, RunCheckpointer
from fedsp.core.aggregation import server_optimizer
from fedsp.data import BinaryVerdict
from fedsp.selfplay import PlayerLogps, RoundContext, get_algorithm, players
from fedsp.selfplay import train as tr
from fedsp.selfplay.players import stack_players
from fedsp.selfplay.spin import Spin
from fedsp.selfplay.tpaw import Tpaw
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

REPLIES = {
    "What is t-A?": "Answer: 5",
    "What is t-B?": "Answer: 12",
    "What is t-C?": "Answer: 1",
    "What is t-D?": "Answer: 30",
}


def _clients():
    return [
        [example("What is t-A?", "4"), example("What is t-B?", "12")],
        [example("What is t-C?", "2"), example("What is t-D?", "3")],
    ]


def _collect(algo, policy, lora, task, round=1, context=None):
    return algo.collect(
        policy,
        lora,
        _clients(),
        task,
        BinaryVerdict(task),
        jax.random.key(0),
        round,
        context=context,
    )


def test_empty_pool_is_spin_with_the_round_start_reference(policy, split_model, task):
    tok = policy.tokenizer
    graphdef, lora, base = split_model
    config = make_config(**{"algorithm.eta": 1.0, "algorithm.lam": 0.5})
    spin = Spin("spin", config, generate_fn=FixedReplies(tok, REPLIES))
    tpaw = Tpaw("tpaw", config, generate_fn=FixedReplies(tok, REPLIES))
    b_spin, _ = _collect(spin, policy, lora, task)
    empty = RoundContext(
        clients=np.arange(2),
        players=stack_players(lora, num_slots=3)[0],
        player_mask=np.zeros(3, bool),
    )
    for context in (None, empty):  # no pool at all, or a pool without players
        b_tpaw, m = _collect(
            Tpaw("tpaw", config, generate_fn=FixedReplies(tok, REPLIES)),
            policy,
            lora,
            task,
            context=context,
        )
        np.testing.assert_array_equal(b_tpaw.players.mask, [[True, False, False]] * 2)
        np.testing.assert_array_equal(b_tpaw.players.pos[:, 0], b_spin.players.pos[:, 0])
        np.testing.assert_array_equal(b_tpaw.players.neg[:, 0], b_spin.players.neg[:, 0])
        assert m["players/count"] == 1.0
    b_tpaw, _ = _collect(tpaw, policy, lora, task)
    for a, b in zip(leaves(b_spin.train), leaves(b_tpaw.train)):
        np.testing.assert_array_equal(a, b)
    for c in range(2):
        new_s, st_s = spin.local_train(graphdef, base, lora, client(b_spin, c), jax.random.key(c))
        new_t, st_t = tpaw.local_train(graphdef, base, lora, client(b_tpaw, c), jax.random.key(c))
        assert float(st_t["loss"]) == pytest.approx(float(st_s["loss"]), rel=1e-6)
        assert float(st_t["margin"]) == pytest.approx(float(st_s["margin"]), rel=1e-5, abs=1e-7)
        for a, b in zip(leaves(new_s), leaves(new_t)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    # With eta = 6 (the paper's) the start is still log 2, but response reweighting
    # changes the update: every P(y⁺) = 0 ≤ 0 at the round start.
    tpaw6 = Tpaw(
        "tpaw", make_config(**{"algorithm.lam": 0.5}), generate_fn=FixedReplies(tok, REPLIES)
    )
    b6, _ = _collect(tpaw6, policy, lora, task)
    _, m6 = pair_loss(tpaw6, graphdef, base, lora, client(b6), jax.random.key(3))
    assert float(m6["loss"]) == pytest.approx(np.log(2.0), abs=1e-5)
    new6, _ = tpaw6.local_train(graphdef, base, lora, client(b6), jax.random.key(0))
    assert not np.allclose(
        leaves(new6)[0],
        leaves(spin.local_train(graphdef, base, lora, client(b_spin), jax.random.key(0))[0])[0],
    )


def _numpy_tpaw(pol_pos, pol_neg, pl_pos, pl_neg, player_mask, valid, lam, eta, gamma):
    p_pos = lam * (pol_pos[None] - pl_pos)
    p_neg = lam * (pol_neg[None] - pl_neg)
    alpha = np.where(p_pos <= 0, eta, 1.0)
    logits = np.where(player_mask[:, None], -gamma * (p_pos - p_neg), -np.inf)
    beta = np.exp(logits - logits.max(0))
    beta = beta / beta.sum(0)
    per = np.log1p(np.exp(-(alpha * p_pos - p_neg)))
    per_pair = np.where(player_mask[:, None], beta * per, 0.0).sum(0)
    return (per_pair * valid).sum() / valid.sum(), alpha


@pytest.mark.parametrize("num_players", [3, 2])
def test_loss_with_k_players_matches_numpy(policy, split_model, task, num_players):
    tok = policy.tokenizer
    graphdef, lora, base = split_model
    lam, eta, gamma = 1.0, 6.0, 0.5
    config = make_config(
        **{
            "algorithm.lam": lam,
            "algorithm.eta": eta,
            "algorithm.gamma": gamma,
            "local.batch_size": 3,
        }
    )
    algo = Tpaw("tpaw", config, generate_fn=FixedReplies(tok, REPLIES))
    team = [perturbed(lora, seed, 0.2) for seed in range(num_players)]
    players, mask = stack_players(*team, num_slots=3)
    context = RoundContext(clients=np.arange(2), players=players, player_mask=mask)
    batch, metrics = _collect(algo, policy, lora, task, context=context)
    assert metrics["players/count"] == num_players
    for j in range(3):
        want = (
            sequence_logps(graphdef, team[j], base, batch.train)
            if j < num_players
            else np.zeros(batch.players.pos.shape[::2])
        )
        np.testing.assert_allclose(np.asarray(batch.players.pos)[:, j], want, rtol=1e-5, atol=1e-4)
    theta = perturbed(lora, 11, 0.2)
    key = jax.random.key(5)
    loss, m = pair_loss(algo, graphdef, base, theta, client(batch), key)
    idx = np.asarray(tr.sample_rows(key, batch.train.valid[0], 3))
    valid = np.asarray(batch.train.valid[0])[idx].astype(np.float64)
    pol_pos = sequence_logps(graphdef, theta, base, batch.train)[0][idx]
    pol_neg = sequence_logps(graphdef, theta, base, batch.lose)[0][idx]
    pl = lambda x: np.asarray(x[0], np.float64)[:, idx]  # noqa: E731
    want, alpha = _numpy_tpaw(
        pol_pos, pol_neg, pl(batch.players.pos), pl(batch.players.neg), mask, valid, lam, eta, gamma
    )
    assert float(loss) == pytest.approx(want, rel=1e-4)
    assert float(m["num_players"]) == num_players
    assert float(m["eta_frac"]) == pytest.approx((alpha[:num_players] == eta).mean(), abs=1e-6)


def test_player_logps_are_computed_once_per_round(policy, split_model, task, monkeypatch):
    tok = policy.tokenizer
    graphdef, lora, base = split_model
    scored, forwards = [], []
    real_score, real_forward = players._score_chunk, tr.sequence_token_logps

    def count_score(graphdef, players, player_mask, base_state, tokens, *rest):
        scored.append((int(np.sum(player_mask)), tokens.shape))
        return real_score(graphdef, players, player_mask, base_state, tokens, *rest)

    def count_forward(*args, **kwargs):
        forwards.append(args[3].shape)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(players, "_score_chunk", count_score)
    # A fresh lam gives a fresh static config, so local_train is traced below.
    algo = Tpaw(
        "tpaw", make_config(**{"algorithm.lam": 0.1234}), generate_fn=FixedReplies(tok, REPLIES)
    )
    team, mask = stack_players(lora, perturbed(lora, 1), perturbed(lora, 2))
    context = RoundContext(clients=np.arange(2), players=team, player_mask=mask)
    batch, metrics = _collect(algo, policy, lora, task, context=context)
    # 2 clients × 2 pairs × (y⁺, y⁻) = 8 responses, in 2 chunks of 2 × batch_size = 4 rows,
    # each chunk scored by the 3 players: one forward per player per response.
    assert scored == [(3, (4, batch.train.tokens.shape[-1]))] * 2
    assert metrics["players/forward_rows"] == 3 * 8
    scored.clear()
    monkeypatch.setattr(tr, "sequence_token_logps", count_forward)
    algo.local_train(graphdef, base, lora, client(batch), jax.random.key(0))
    assert scored == []  # no player forward inside local training
    # Traced once (the scan body): ONE forward, the trained policy's, on y⁺ and y⁻ rows.
    assert forwards == [(2 * algo.hp.train.batch_size, batch.train.tokens.shape[-1])]
    # ... and the loss reads the stored player log-probs.
    c = client(batch)
    shifted = jax.tree.map(lambda x: x, c)
    object.__setattr__(
        shifted,
        "players",
        PlayerLogps(pos=c.players.pos + 1.0, neg=c.players.neg, mask=c.players.mask),
    )
    base_loss, _ = pair_loss(algo, graphdef, base, lora, c, jax.random.key(1))
    moved, _ = pair_loss(algo, graphdef, base, lora, shifted, jax.random.key(1))
    assert float(moved) != pytest.approx(float(base_loss), rel=1e-4)


# ---------------------------------------------------------------------------- the loop


class Killed(Exception):
    pass


class DiesAt:
    """The algorithm, except that ``collect`` of round ``round`` kills the run."""

    def __init__(self, algorithm, round):
        self._algorithm, self._round = algorithm, round

    def __getattr__(self, name):
        return getattr(self._algorithm, name)

    def collect(self, *args, **kwargs):
        if args[6] == self._round:
            raise Killed(f"round {self._round}")
        return self._algorithm.collect(*args, **kwargs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _config(model_dir, **overrides):
    return fixtures.tiny_config(
        model_dir,
        fl__rounds=3,
        fl__clients_per_round=2,
        algorithm__name="tpaw",
        rollout__prompts_per_client=2,
        rollout__max_new_tokens=4,
        data__limit=16,
        local__steps=2,
        local__batch_size=2,
        local__max_len=96,
        eval__examples=2,
        eval__max_new_tokens=2,
        **overrides,
    )


def _history(workdir):
    return [
        {k: v for k, v in json.loads(line).items() if not k.startswith(("time", "collect/time/"))}
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pool_in_the_loop_resumes_exactly_and_survives_a_missing_entry(model_dir, tmp_path):
    config = _config(model_dir)
    full = fedsp.run(config, tmp_path / "full", algorithm=get_algorithm("tpaw", config))
    history = _history(tmp_path / "full")
    # Round 0's adapters, then each round's global adapters enter; the last 3 stay.
    assert [r.get("collect/players/count") for r in history[1:]] == [1.0, 2.0, 3.0]
    assert [r["pool/rounds"] for r in history[1:]] == [[0], [0, 1], [0, 1, 2]]
    pool = PlayerPool(tmp_path / "full" / "pool", max_players=3)
    assert pool.rounds == (1, 2, 3) and pool.entries[-1].metadata["loss"] == history[3]["loss"]
    assert pool.entries[-1].score == full["final_accuracy"]

    # Killed in round 3, then resumed: the same players, opponent data and numbers.
    with pytest.raises(Killed):
        fedsp.run(config, tmp_path / "resumed", algorithm=DiesAt(get_algorithm("tpaw", config), 3))
    shutil.copytree(tmp_path / "resumed", tmp_path / "damaged")
    assert PlayerPool(tmp_path / "resumed" / "pool", max_players=3).rounds == (0, 1, 2)
    fedsp.run(config, tmp_path / "resumed", algorithm=get_algorithm("tpaw", config))
    assert _history(tmp_path / "resumed") == history
    start = fedsp.init_run(config).run
    graphdef, lora, base = start.policy.graphdef, start.initial_params, start.policy.base_state
    resumed_pool = PlayerPool(tmp_path / "resumed" / "pool", max_players=3)
    assert resumed_pool.rounds == (1, 2, 3)
    for i in range(3):
        for a, b in zip(leaves(pool.load(i, lora)), leaves(resumed_pool.load(i, lora))):
            np.testing.assert_array_equal(a, b)

    # The newest player is the final global model: its restored adapters reproduce the
    # logits of the run checkpoint's adapters.
    fl = config.fl
    opt = server_optimizer(fl.server_optimizer, fl.server_lr, fl.b1, fl.b2, fl.tau, fl.v0)
    template = RoundState(
        round=0,
        params=lora,
        opt_state=opt.init(lora),
        rng=jax.random.key(config.seed),
        baselines=jnp.full((config.data.num_clients,), jnp.nan, jnp.float32),
    )
    with RunCheckpointer(tmp_path / "full" / "checkpoints") as ckpt:
        final = ckpt.restore(template)
    assert final.pool == pool.state_dict()
    tokens = jnp.asarray([[1, 5, 9, 200, 7, 3]], jnp.int32)
    forward = jax.jit(lambda a: nnx.merge(graphdef, a, base)(tokens))
    np.testing.assert_array_equal(forward(pool.load(-1, lora)), forward(final.params))

    # A missing player: a clear error naming it ("raise"); with "drop" (the default) the
    # run warns, goes on with the other players, and keeps them.
    shutil.rmtree(tmp_path / "damaged" / "pool" / "round_000001")
    damaged = PlayerPool(tmp_path / "damaged" / "pool", max_players=3)
    with pytest.raises(CorruptCheckpointError, match=r"round 1: .*round_000001 is missing"):
        damaged.stacked(lora, on_error="raise")
    assert damaged.rounds == (0, 1, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fedsp.run(config, tmp_path / "damaged", algorithm=get_algorithm("tpaw", config))
    assert any("round 1" in str(w.message) and "dropped" in str(w.message) for w in caught)
    last = _history(tmp_path / "damaged")[3]
    assert last["pool/dropped"] == [1] and last["pool/rounds"] == [0, 2]
    assert last["collect/players/count"] == 2.0
    assert PlayerPool(tmp_path / "damaged" / "pool", max_players=3).rounds == (0, 2, 3)
