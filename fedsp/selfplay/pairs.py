"""Pairwise self-play on (prompt, gold response) data: what SPIN, TPAW and DPO share.

Per client and round (`PairwiseSelfPlay.collect`, then ``local_train``):

1. one sample y_gen per prompt from the round's adapters θ_r, for every sampled client's
   prompts in ONE batched generation (each row with its own key, as every algorithm);
2. this round's pairs (x, y⁺, y⁻): y⁺ is the gold response (`train.gold_completion` +
   end of turn), y⁻ the sample (DPO: or the example's own rejected response); the
   client trains on them together with its opponent data of its previous
   ``opponent_rounds − 1`` rounds (SPIN: D_t ∪ D_{t−1}; TPAW: D_t ∪ D_{t−1} ∪ D_{t−2}),
   which it keeps as token ids in client-side state (`OpponentHistory`,
   ``client_state``): the loop checkpoints it beside the run state, never on the server;
3. the players' sequence log-probs of every y⁺ and y⁻: ONE forward per player per
   response, without gradient, batched over all clients (`score_sequences`: one jitted
   call per chunk of rows covers every player), stored in
   ``ClientBatch.players`` as [C, J, S] (`fedsp.selfplay.base.PlayerLogps`);
4. ``local.steps`` AdamW steps on ``local.batch_size`` pairs each: one forward of the
   trained policy over the minibatch's y⁺ and y⁻ rows, then the algorithm's loss on those
   sequence log-probs and the stored players' log-probs. Players are never recomputed
   inside the loss (that would cost J extra forwards per step; see benchmarks/players.py).

Subclasses (`fedsp.selfplay.spin`, `tpaw`, `dpo`) choose the players, the loss and which
pairs to keep. A sequence log-prob is Σ_t log π(y_t | x, y_<t) over the completion tokens
(the loss mask); prompts longer than ``local.max_len`` keep their end (`train.pack`).

A client without pairs does not train (its adapter comes back unchanged, weight 0);
otherwise its FedAvg weight is its number of pairs. No reward is observed, so
advantages are 0 and baselines carry over; ``wins``/``losses`` count this round's
samples the task judges right/wrong (a progress signal only).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.core.losses import dpo_loss, spin_loss, tpaw_loss
from fedsp.data.base import Example, Task
from fedsp.data.feedback import FeedbackProvider
from fedsp.selfplay import rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import (
    ClientBatch,
    PlayerLogps,
    Policy,
    RoundContext,
    Sequences,
    config_value,
)
from fedsp.selfplay.spear import GenerateFn

KINDS = ("spin", "tpaw", "dpo")


@dataclasses.dataclass(frozen=True)
class PairHParams:
    """Hyper-parameters of the pairwise algorithms (hashable: a static jit argument).

    Attributes:
      kind: "spin", "tpaw" or "dpo" (the loss).
      train: the shared local-training settings (`train.HParams`).
      lam: λ, the implicit-reward scale of SPIN and TPAW (SPIN reference β = 0.1).
      eta: TPAW's response weight η of gold responses with P_j(y⁺) ≤ 0 (paper: 6).
      gamma: TPAW's player-weight sharpness γ (paper: 0.5).
      beta: DPO's β (Rafailov et al. 2023: 0.1).
      label_smoothing: DPO's cDPO ε.
      n_max: TPAW's team size N_max (paper: 3), the player axis J of its batches.
      opponent_rounds: rounds of opponent data trained each round, this one included.
    """

    kind: str
    train: tr.HParams
    lam: float = 0.1
    eta: float = 6.0
    gamma: float = 0.5
    beta: float = 0.1
    label_smoothing: float = 0.0
    n_max: int = 3
    opponent_rounds: int = 2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        checks = {
            "algorithm.lam": self.lam > 0,
            "algorithm.eta": self.eta > 0,
            "algorithm.gamma": self.gamma >= 0,
            "algorithm.beta": self.beta > 0,
            "algorithm.label_smoothing": 0.0 <= self.label_smoothing <= 0.5,
            "algorithm.n_max": self.n_max >= 1,
            "algorithm.opponent_rounds": self.opponent_rounds >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = {name: getattr(self, name.split(".")[1]) for name in bad}
            raise ValueError(f"invalid config field(s) {values}")

    def static(self) -> PairHParams:
        """Only what the jitted local step reads (see `train.HParams.static`)."""
        return dataclasses.replace(self, train=self.train.static(), n_max=1, opponent_rounds=1)

    @classmethod
    def from_config(cls, kind: str, config: Any, opponent_rounds: int) -> PairHParams:
        """Reads ``config.algorithm.*`` (``opponent_rounds`` None: the given default)."""
        d = cls(kind, tr.HParams())
        a = lambda f: config_value(config, "algorithm", f, getattr(d, f))  # noqa: E731
        return cls(
            kind=kind,
            train=tr.HParams.from_config(config),
            lam=float(a("lam")),
            eta=float(a("eta")),
            gamma=float(a("gamma")),
            beta=float(a("beta")),
            label_smoothing=float(a("label_smoothing")),
            n_max=int(a("n_max")),
            opponent_rounds=int(config_value(config, "algorithm", "opponent_rounds",
                                             opponent_rounds)),
        )


# ---------------------------------------------------------------------------- host data


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (x, y⁺, y⁻) of a client, host side: token ids, never text."""

    prompt: np.ndarray
    pos: np.ndarray
    neg: np.ndarray


class OpponentHistory:
    """Each client's pairs of its last ``rounds_kept`` rounds, keyed by global client id.

    ``state_dict`` / ``load_state_dict`` turn it into flat numpy arrays (for
    `fedsp.checkpoint.save_client_state`) and back.
    """

    def __init__(self, rounds_kept: int):
        if rounds_kept < 0:
            raise ValueError(f"rounds_kept must be >= 0, got {rounds_kept}")
        self.rounds_kept = rounds_kept
        self._data: dict[int, list[tuple[int, list[Pair]]]] = {}

    def past(self, client: int, before_round: int) -> list[Pair]:
        """The client's kept pairs of rounds before ``before_round``, newest round first."""
        rounds = [(r, p) for r, p in self._data.get(int(client), []) if r < before_round]
        return [pair for _, pairs in sorted(rounds, key=lambda x: -x[0]) for pair in pairs]

    def record(self, client: int, round: int, pairs: Sequence[Pair]) -> None:  # noqa: A002
        """Keeps ``pairs`` as the client's data of ``round`` (replacing an earlier record
        of the same round), dropping rounds beyond ``rounds_kept``."""
        if self.rounds_kept == 0:
            return
        kept = [(r, p) for r, p in self._data.get(int(client), []) if r != round]
        kept = sorted(kept + [(int(round), list(pairs))], key=lambda x: x[0])
        self._data[int(client)] = kept[-self.rounds_kept:]

    def num_pairs(self) -> int:
        return sum(len(p) for rounds in self._data.values() for _, p in rounds)

    def state_dict(self) -> dict[str, np.ndarray]:
        clients, rounds, lengths, tokens = [], [], [], []
        for client in sorted(self._data):
            for round_, pairs in self._data[client]:
                for pair in pairs:
                    clients.append(client)
                    rounds.append(round_)
                    lengths.append([len(pair.prompt), len(pair.pos), len(pair.neg)])
                    tokens.extend([pair.prompt, pair.pos, pair.neg])
        return {
            "client": np.asarray(clients, np.int64),
            "round": np.asarray(rounds, np.int64),
            "lengths": np.asarray(lengths, np.int64).reshape(-1, 3),
            "tokens": (np.concatenate(tokens).astype(np.int32) if tokens
                       else np.zeros((0,), np.int32)),
        }

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        missing = [k for k in ("client", "round", "lengths", "tokens") if k not in arrays]
        if missing:
            raise ValueError(f"opponent history arrays lack {missing}; got {sorted(arrays)}")
        lengths = np.asarray(arrays["lengths"]).reshape(-1, 3)
        tokens = np.asarray(arrays["tokens"], np.int32)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"opponent history: lengths sum to {int(lengths.sum())} but "
                             f"tokens holds {tokens.size}")
        data: dict[int, dict[int, list[Pair]]] = {}
        offset = 0
        for client, round_, (n_p, n_pos, n_neg) in zip(arrays["client"], arrays["round"],
                                                       lengths):
            cut = np.cumsum([offset, n_p, n_pos, n_neg])
            pair = Pair(tokens[cut[0]:cut[1]], tokens[cut[1]:cut[2]], tokens[cut[2]:cut[3]])
            data.setdefault(int(client), {}).setdefault(int(round_), []).append(pair)
            offset = int(cut[3])
        self._data = {c: sorted(rounds.items())[-self.rounds_kept:] if self.rounds_kept else []
                      for c, rounds in data.items()}


# ---------------------------------------------------------------------------- scoring


def _sequence_logps(graphdef, lora_state, base_state, tokens, attention_mask, loss_mask):
    """[N] Σ over ``loss_mask`` of the token log-probs under one player's adapters."""
    logps = tr.sequence_token_logps(graphdef, lora_state, base_state, tokens, attention_mask)
    return jnp.sum(jnp.where(loss_mask > 0, logps, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _score_chunk(graphdef, players, player_mask, base_state, tokens, attention_mask, loss_mask):
    """[J, R] scores of one R-row chunk under every player of the stack [J, ...].

    A sequential map over the J slots; a masked slot takes the other branch of a
    ``lax.cond`` (0, no forward). One compiled program serves every round whatever the
    number of real players and of rows, so a filling pool or growing opponent data
    compiles nothing new.
    """

    def per_player(slot):
        adapters, real = slot
        return jax.lax.cond(
            real,
            lambda: _sequence_logps(graphdef, adapters, base_state, tokens, attention_mask,
                                    loss_mask),
            lambda: jnp.zeros(tokens.shape[:1], jnp.float32),
        )

    return jax.lax.map(per_player, (players, player_mask))


def score_sequences(
    graphdef: nnx.GraphDef,
    base_state: nnx.State,
    players: Any,
    player_mask: np.ndarray,
    tokens: np.ndarray,
    attention_mask: np.ndarray,
    loss_mask: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """[J, N] sequence log-probs of N rows under each of J players, without gradient.

    One forward per real player per row: rows go through in chunks of ``batch_size``
    (the last chunk padded with copies of the first row), each chunk in one jitted call
    over all players; masked players are skipped (their entries are 0).

    Args:
      graphdef, base_state: the split model's graph and frozen base.
      players: adapters stacked on a leading J axis.
      player_mask: [J] bool, False for padding slots.
      tokens, attention_mask, loss_mask: [N, T] rows (`Sequences` fields, flattened).
      batch_size: rows per forward.
    """
    player_mask = np.asarray(player_mask, bool)
    n = tokens.shape[0]
    if n == 0 or not player_mask.any():
        return np.zeros((player_mask.shape[0], n), np.float32)
    chunk = min(batch_size, 1 << (n - 1).bit_length())
    padded = -(-n // chunk) * chunk
    fill = np.zeros(padded - n, np.int64)
    rows = [np.concatenate([np.asarray(x), np.asarray(x)[fill]]) for x in
            (tokens, attention_mask, loss_mask)]
    mask = jnp.asarray(player_mask)
    parts = [_score_chunk(graphdef, players, mask, base_state, *(x[s:s + chunk] for x in rows))
             for s in range(0, padded, chunk)]
    return np.concatenate(jax.device_get(parts), axis=1)[:, :n]


def _widen(seqs: Sequences, width: int, pad_id: int) -> Sequences:
    """``seqs`` right-padded to ``width`` tokens."""
    extra = width - seqs.tokens.shape[-1]
    if extra == 0:
        return seqs
    pad = [(0, 0)] * (seqs.tokens.ndim - 1) + [(0, extra)]
    return dataclasses.replace(
        seqs,
        tokens=jnp.pad(seqs.tokens, pad, constant_values=pad_id),
        attention_mask=jnp.pad(seqs.attention_mask, pad),
        loss_mask=jnp.pad(seqs.loss_mask, pad),
    )


def pack_pairs(
    pairs: Sequence[Sequence[Pair]], max_len: int, pad_id: int
) -> tuple[Sequences, Sequences]:
    """(y⁺ rows, y⁻ rows) as [C, S, T] with row s of one paired with row s of the other."""
    pos = tr.pack([[tr.Trace(p.prompt, p.pos) for p in c] for c in pairs], max_len, pad_id)
    neg = tr.pack([[tr.Trace(p.prompt, p.neg) for p in c] for c in pairs], max_len, pad_id)
    width = max(pos.tokens.shape[-1], neg.tokens.shape[-1])
    return _widen(pos, width, pad_id), _widen(neg, width, pad_id)


def score_pairs(
    graphdef: nnx.GraphDef,
    base_state: nnx.State,
    players: Any,
    player_mask: np.ndarray,
    pos: Sequences,
    neg: Sequences,
    batch_size: int,
) -> PlayerLogps:
    """Every valid pair's y⁺ and y⁻ scored by every real player: `PlayerLogps` [C, J, S]."""
    c, s, t = pos.tokens.shape
    valid = np.asarray(pos.valid).reshape(-1)
    flat = lambda x: np.asarray(x).reshape(c * s, t)[valid]  # noqa: E731
    tokens = np.concatenate([flat(pos.tokens), flat(neg.tokens)])
    attention = np.concatenate([flat(pos.attention_mask), flat(neg.attention_mask)])
    loss_mask = np.concatenate([flat(pos.loss_mask), flat(neg.loss_mask)])
    scores = score_sequences(graphdef, base_state, players, player_mask, tokens, attention,
                             loss_mask, batch_size)
    j = scores.shape[0]
    n = int(valid.sum())
    out_pos = np.zeros((j, c * s), np.float32)
    out_neg = np.zeros((j, c * s), np.float32)
    out_pos[:, valid], out_neg[:, valid] = scores[:, :n], scores[:, n:]
    to_cjs = lambda x: jnp.asarray(x.reshape(j, c, s).transpose(1, 0, 2))  # noqa: E731
    mask = jnp.asarray(np.broadcast_to(np.asarray(player_mask, bool), (c, j)))
    return PlayerLogps(pos=to_cjs(out_pos), neg=to_cjs(out_neg), mask=mask)


def stack_players(*adapters: Any, num_slots: int | None = None) -> tuple[Any, np.ndarray]:
    """Adapters stacked on a leading J axis (padded with zeros to ``num_slots``), and the
    [J] mask of the real ones."""
    num_slots = len(adapters) if num_slots is None else num_slots
    pad = [jax.tree.map(jnp.zeros_like, adapters[0])] * (num_slots - len(adapters))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *adapters, *pad)
    return stacked, np.arange(num_slots) < len(adapters)


# ---------------------------------------------------------------------------- algorithm


class PairwiseSelfPlay:
    """Shared collect / local_train of SPIN, TPAW and DPO; see the module docstring.

    Subclasses set `kind` and `default_opponent_rounds` and implement `players`; they may
    override `chosen_text`, `rejected_text` (a given y⁻ instead of a sample) and
    `keep_pair`.

    Args:
      name: the registered name.
      config: the run config (``algorithm``, ``rollout``, ``local``, ``fl`` sections).
      generate_fn: the rollout sampler (default `fedsp.selfplay.rollout.generate`);
        tests inject scripted completions.
    """

    kind: ClassVar[str]
    default_opponent_rounds: ClassVar[int]
    uses_context = True

    def __init__(self, name: str, config: Any, generate_fn: GenerateFn | None = None):
        self.name = name
        self.hp = PairHParams.from_config(self.kind, config, self.default_opponent_rounds)
        self.sampling = tr.sampling_params(config)
        self.generate_fn = rollout.generate if generate_fn is None else generate_fn
        self.history = OpponentHistory(self.hp.opponent_rounds - 1)

    # ------------------------------------------------------------------ hooks

    def players(
        self, lora_state: nnx.State, context: RoundContext | None
    ) -> tuple[Any, np.ndarray]:
        """(adapters stacked [J, ...], [J] bool mask) of the round's players."""
        raise NotImplementedError

    def chosen_text(self, task: Task, example: Example) -> str:
        """y⁺ for ``example``: the gold response (`train.gold_completion`)."""
        return tr.gold_completion(task, example)

    def rejected_text(self, example: Example) -> str | None:
        """A given y⁻ for ``example``, or None to sample one from θ_r."""
        del example
        return None

    def keep_pair(self, sample_correct: bool | None) -> bool:
        """Whether this round's pair is trained (``sample_correct`` None: y⁻ was given)."""
        del sample_correct
        return True

    # ------------------------------------------------------------------ client state

    def client_state(self) -> dict[str, np.ndarray]:
        """The clients' opponent data of earlier rounds (token ids), for the loop to save."""
        return self.history.state_dict()

    def load_client_state(self, arrays: Mapping[str, np.ndarray] | None) -> None:
        """Restores `client_state` output; None starts with no opponent data."""
        self.history = OpponentHistory(self.hp.opponent_rounds - 1)
        if arrays:
            self.history.load_state_dict(arrays)

    # ------------------------------------------------------------------ host side

    def collect(
        self,
        policy: Policy,
        lora_state: nnx.State,
        client_examples: Sequence[Sequence[Example]],
        task: Task,
        feedback: FeedbackProvider,
        key: jax.Array,
        round: int,  # noqa: A002
        *,
        baselines: Sequence[float] | np.ndarray | None = None,
        context: RoundContext | None = None,
    ) -> tuple[ClientBatch, dict[str, float]]:
        """See `fedsp.selfplay.base.Algorithm.collect` (``feedback`` unused: the gold
        response is the target); ``context`` gives the clients' global ids (default
        0..C−1), the round-0 adapters and the pool's players."""
        del feedback
        hp, tok = self.hp, policy.tokenizer
        num_clients = len(client_examples)
        if num_clients == 0:
            raise ValueError("client_examples is empty: no client was sampled")
        ids = (np.arange(num_clients) if context is None
               else np.asarray(context.clients, np.int64))
        if ids.shape != (num_clients,):
            raise ValueError(f"context.clients must hold one id per client ({num_clients}), "
                             f"got shape {ids.shape}")
        players, player_mask = self.players(lora_state, context)
        end = tr.end_of_turn_id(tok)
        rows = [(c, i, ex) for c, exs in enumerate(client_examples) for i, ex in enumerate(exs)]
        prompts = [rollout.prompt_ids(tok, task, ex) for _, _, ex in rows]
        sampled = [j for j, (_, _, ex) in enumerate(rows) if self.rejected_text(ex) is None]
        start = time.perf_counter()
        keys = rollout.row_keys(key, round, 0, [rows[j][0] for j in sampled],
                                [rows[j][1] for j in sampled])
        outs = dict(zip(sampled, self.generate_fn(policy, lora_state, [prompts[j] for j in sampled],
                                                   keys, self.sampling) if sampled else []))

        generate_s = time.perf_counter() - start
        this_round: list[list[Pair]] = [[] for _ in range(num_clients)]
        correct = np.zeros(num_clients, np.float32)
        wrong = np.zeros(num_clients, np.float32)
        for j, (c, _, ex) in enumerate(rows):
            if j in outs:
                neg = list(outs[j].tokens) or [end]
                ok = bool(task.is_correct(outs[j].text, ex))
                correct[c] += ok
                wrong[c] += not ok
            else:
                neg, ok = tok.encode(self.rejected_text(ex)) + [end], None
            if not self.keep_pair(ok):
                continue
            pos = tok.encode(self.chosen_text(task, ex)) + [end]
            this_round[c].append(Pair(np.asarray(prompts[j], np.int32), np.asarray(pos, np.int32),
                                      np.asarray(neg, np.int32)))
        pairs = []
        for c in range(num_clients):
            pairs.append(this_round[c] + self.history.past(ids[c], round))
            self.history.record(ids[c], round, this_round[c])

        pos, neg = pack_pairs(pairs, hp.train.max_len, tok.pad_token_id)
        start = time.perf_counter()
        player_logps = score_pairs(policy.graphdef, policy.base_state, players, player_mask,
                                   pos, neg, 2 * hp.train.batch_size)
        score_s = time.perf_counter() - start
        counts = np.asarray([len(p) for p in pairs], np.float32)
        lr = tr.round_lr(hp.train, round)
        batch = ClientBatch(
            train=pos,
            lose=neg,
            lr=jnp.full((num_clients,), lr, jnp.float32),
            num_examples=jnp.asarray(counts),
            mean_advantage=jnp.zeros((num_clients,), jnp.float32),
            baseline=jnp.asarray(tr.prev_baselines(baselines, num_clients)),
            wins=jnp.asarray(correct),
            losses=jnp.asarray(wrong),
            players=player_logps,
        )
        fresh = float(sum(len(p) for p in this_round))
        metrics = {
            "rollout/accuracy": float(correct.sum() / max(1, len(sampled))),
            "rollout/generated": float(len(sampled)),
            "pairs/this_round": fresh,
            "pairs/opponent_history": float(counts.sum() - fresh),
            "players/count": float(np.sum(player_mask)),
            "players/forward_rows": float(np.sum(player_mask) * 2 * counts.sum()),
            "time/generate_s": generate_s,
            "time/score_players_s": score_s,
            "lr": lr,
        }
        return batch, metrics

    # ------------------------------------------------------------------ client side

    def local_train(
        self,
        graphdef: nnx.GraphDef,
        base_state: nnx.State,
        lora_state: nnx.State,
        batch_c: ClientBatch,
        key_c: jax.Array,
    ) -> tuple[nnx.State, dict[str, jax.Array]]:
        """See `fedsp.selfplay.base.Algorithm.local_train`."""
        return _pair_local_train(graphdef, self.hp.static(), base_state, lora_state, batch_c,
                                 key_c)


def pair_loss(
    hp: PairHParams,
    pol_pos: jax.Array,
    pol_neg: jax.Array,
    players: PlayerLogps,
    mask: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``hp.kind`` loss of [B] policy log-probs against players' [J, B] log-probs."""
    if hp.kind == "tpaw":
        return tpaw_loss(pol_pos, pol_neg, players.pos, players.neg, players.mask,
                         lam=hp.lam, eta=hp.eta, gamma=hp.gamma, mask=mask)
    if hp.kind == "spin":
        return spin_loss(pol_pos, pol_neg, players.pos[0], players.neg[0], lam=hp.lam, mask=mask)
    return dpo_loss(pol_pos, pol_neg, players.pos[0], players.neg[0], beta=hp.beta,
                    label_smoothing=hp.label_smoothing, mask=mask)


def pair_minibatch_loss(
    graphdef: nnx.GraphDef,
    hp: PairHParams,
    base_state: nnx.State,
    lora_state: nnx.State,
    batch_c: ClientBatch,
    key: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`pair_loss` on ``local.batch_size`` pairs of one client: one policy forward over
    their y⁺ and y⁻ rows; the players' log-probs are read from ``batch_c.players``."""
    idx = tr.sample_rows(key, batch_c.train.valid, hp.train.batch_size)
    pos = tr.gather_rows(batch_c.train, idx)
    neg = tr.gather_rows(batch_c.lose, idx)
    b = idx.shape[0]
    tokens = jnp.concatenate([pos.tokens, neg.tokens])
    attention = jnp.concatenate([pos.attention_mask, neg.attention_mask])
    loss_mask = jnp.concatenate([pos.loss_mask, neg.loss_mask])
    logps = tr.sequence_token_logps(graphdef, lora_state, base_state, tokens, attention)
    seq = jnp.sum(jnp.where(loss_mask > 0, logps, 0.0), axis=-1)
    pol_pos, pol_neg = seq[:b], seq[b:]
    players = batch_c.players
    picked = PlayerLogps(pos=players.pos[:, idx], neg=players.neg[:, idx], mask=players.mask)
    loss, metrics = pair_loss(hp, pol_pos, pol_neg, picked, pos.valid)
    count = jnp.maximum(jnp.sum(pos.valid), 1).astype(jnp.float32)
    metrics = {**metrics,
               "logp_pos": jnp.sum(jnp.where(pos.valid, pol_pos, 0.0)) / count,
               "logp_neg": jnp.sum(jnp.where(pos.valid, pol_neg, 0.0)) / count}
    return loss, metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def _pair_local_train(graphdef, hp, base_state, lora_state, batch_c, key_c):
    loss_fn = functools.partial(pair_minibatch_loss, graphdef, hp, base_state)
    trained, metrics = tr.fit(lambda lora, k: loss_fn(lora, batch_c, k), lora_state, key_c,
                              batch_c.lr, hp.train)
    has_pairs = jnp.any(batch_c.train.valid)
    return tr.keep_if(has_pairs, trained, lora_state), tr.client_stats(batch_c, metrics,
                                                                       has_pairs)


__all__ = [
    "KINDS",
    "OpponentHistory",
    "Pair",
    "PairHParams",
    "PairwiseSelfPlay",
    "pack_pairs",
    "pair_loss",
    "pair_minibatch_loss",
    "score_pairs",
    "score_sequences",
    "stack_players",
]
