"""Pairwise self-play on (prompt, gold response) data: what SPIN, TPAW and DPO share.

Per client and round (`PairwiseSelfPlay.collect`, then ``local_train``):

1. one sample y_gen per prompt from the round's adapters θ_r, for every sampled client's
   prompts in ONE batched generation (each row with its own key, as every algorithm);
2. this round's pairs (x, y⁺, y⁻): y⁺ is the gold response (`packing.gold_completion` +
   end of turn), y⁻ the sample (DPO: or the example's own rejected response); the
   client trains on them together with its opponent data of its previous
   ``opponent_rounds − 1`` rounds (SPIN: D_t ∪ D_{t−1}; TPAW: D_t ∪ D_{t−1} ∪ D_{t−2}),
   which it keeps as token ids in client-side state (`fedsp.selfplay.opponents`,
   ``client_state``): the loop checkpoints it beside the run state, never on the server;
3. the players' sequence log-probs of every y⁺ and y⁻: ONE forward per player per
   response, without gradient, batched over all clients (`fedsp.selfplay.players`: one
   jitted call per chunk of rows covers every player), stored in ``ClientBatch.players``
   as [C, J, S] (`fedsp.selfplay.base.PlayerLogps`);
4. ``local.steps`` AdamW steps on ``local.batch_size`` pairs each: one forward of the
   trained policy over the minibatch's y⁺ and y⁻ rows, then the algorithm's loss on those
   sequence log-probs and the stored players' log-probs. Players are never recomputed
   inside the loss (that would cost J extra forwards per step; see benchmarks/players.py).

Subclasses (`fedsp.selfplay.spin`, `tpaw`, `dpo`) choose the players, the loss and which
pairs to keep. A sequence log-prob is Σ_t log π(y_t | x, y_<t) over the completion tokens
(the loss mask); prompts longer than ``local.max_len`` keep their end (`packing.pack`).

A client without pairs does not train (its adapter comes back unchanged, weight 0);
otherwise its FedAvg weight is its number of pairs. No reward is observed, so
advantages are 0 and baselines carry over; ``wins``/``wrong`` count this round's
samples the task judges right/wrong (a progress signal only).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.core.losses import dpo_loss, spin_loss, tpaw_loss
from fedsp.data.base import Example, Task
from fedsp.selfplay import packing, rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import (
    ClientBatch,
    Collector,
    PlayerLogps,
    RoundContext,
    RoundInputs,
    client_batch,
)
from fedsp.selfplay.hparams import HParams, round_lr
from fedsp.selfplay.opponents import OpponentHistory, Pair
from fedsp.selfplay.players import pack_pairs, score_pairs

KINDS = ("spin", "tpaw", "dpo")


@dataclasses.dataclass(frozen=True)
class PairHParams:
    """Hyper-parameters of the pairwise algorithms (hashable: a static jit argument).

    Attributes:
      kind: "spin", "tpaw" or "dpo" (the loss).
      train: the shared local-training settings (`HParams`).
      lam: λ, the implicit-reward scale of SPIN and TPAW (``algorithm.lam``).
      eta: TPAW's response weight η of gold responses with P_j(y⁺) ≤ 0.
      gamma: TPAW's player-weight sharpness γ.
      beta: DPO's β.
      label_smoothing: DPO's cDPO ε.
      n_max: TPAW's team size N_max, the player axis J of its batches.
      opponent_rounds: rounds of opponent data trained each round, this one included.
    """

    kind: str
    train: HParams
    lam: float
    eta: float
    gamma: float
    beta: float
    label_smoothing: float
    n_max: int
    opponent_rounds: int

    def static(self) -> PairHParams:
        """Only what the jitted local step reads (see `HParams.static`)."""
        return dataclasses.replace(self, train=self.train.static(), n_max=1, opponent_rounds=1)

    @classmethod
    def from_config(cls, kind: str, config: Any, opponent_rounds: int) -> PairHParams:
        """Reads ``config.algorithm`` of a validated config; ``algorithm.opponent_rounds``
        None means the algorithm's own ``opponent_rounds``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        a = config.algorithm
        return cls(
            kind=kind,
            train=HParams.from_config(config),
            lam=float(a.lam),
            eta=float(a.eta),
            gamma=float(a.gamma),
            beta=float(a.beta),
            label_smoothing=float(a.label_smoothing),
            n_max=int(a.n_max),
            opponent_rounds=int(
                opponent_rounds if a.opponent_rounds is None else a.opponent_rounds
            ),
        )


class PairwiseSelfPlay(Collector, tr.LocalTraining):
    """Shared collect / local_train of SPIN, TPAW and DPO; see the module docstring.

    Subclasses set `kind` and `default_opponent_rounds` and implement `players`; they may
    override `chosen_text`, `rejected_text` (a given y⁻ instead of a sample) and
    `keep_pair`.

    Args:
      name: the registered name.
      config: a validated run config (`fedsp.config.default_config` schema).
      generate_fn: the rollout sampler (default `fedsp.selfplay.rollout.sample_completions`);
        tests inject scripted completions.
    """

    kind: ClassVar[str]
    default_opponent_rounds: ClassVar[int]
    uses_context = True

    def __init__(self, name: str, config: Any, generate_fn: rollout.Rollout | None = None):
        self.name = name
        self.hp = PairHParams.from_config(self.kind, config, self.default_opponent_rounds)
        self.sampling = rollout.SamplingParams.from_config(config)
        self.generate_fn = rollout.sample_completions if generate_fn is None else generate_fn
        self.history = OpponentHistory(self.hp.opponent_rounds - 1)

    # ------------------------------------------------------------------ hooks

    def players(
        self, lora_state: nnx.State, context: RoundContext | None
    ) -> tuple[Any, np.ndarray]:
        """(adapters stacked [J, ...], [J] bool mask) of the round's players."""
        raise NotImplementedError

    def chosen_text(self, task: Task, example: Example) -> str:
        """y⁺ for ``example``: the gold response (`packing.gold_completion`)."""
        return packing.gold_completion(task, example)

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

    def collect_batch(self, inputs: RoundInputs) -> tuple[ClientBatch, dict[str, float]]:
        """See `fedsp.selfplay.base.Algorithm.collect` (``feedback`` unused: the gold
        response is the target); ``context`` gives the clients' global ids (default
        0..C−1), the round-0 adapters and the pool's players."""
        policy, task, key, round = inputs.policy, inputs.task, inputs.key, inputs.round
        hp, tok = self.hp, policy.tokenizer
        num_clients, context = inputs.num_clients, inputs.context
        ids = np.arange(num_clients) if context is None else np.asarray(context.clients, np.int64)
        if ids.shape != (num_clients,):
            raise ValueError(
                f"context.clients must hold one id per client ({num_clients}), "
                f"got shape {ids.shape}"
            )
        players, player_mask = self.players(inputs.lora_state, context)
        end = packing.end_of_turn_id(tok)
        rows = [
            (c, i, ex) for c, exs in enumerate(inputs.client_examples) for i, ex in enumerate(exs)
        ]
        prompts = [rollout.prompt_ids(tok, task, ex) for _, _, ex in rows]
        sampled = [j for j, (_, _, ex) in enumerate(rows) if self.rejected_text(ex) is None]
        start = time.perf_counter()
        keys = rollout.rollout_keys(
            key,
            round,
            0,
            [inputs.slot(rows[j][0]) for j in sampled],
            [rows[j][1] for j in sampled],
        )
        outs = dict(
            zip(
                sampled,
                self.generate_fn(
                    policy, inputs.lora_state, [prompts[j] for j in sampled], keys, self.sampling
                )
                if sampled
                else [],
            )
        )

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
                rejected = self.rejected_text(ex)
                assert rejected is not None  # rows without a rejected text were sampled
                neg, ok = [*tok.encode(rejected), end], None
            if not self.keep_pair(ok):
                continue
            pos = [*tok.encode(self.chosen_text(task, ex)), end]
            this_round[c].append(
                Pair(
                    np.asarray(prompts[j], np.int32),
                    np.asarray(pos, np.int32),
                    np.asarray(neg, np.int32),
                )
            )
        pairs = []
        for c in range(num_clients):
            pairs.append(this_round[c] + self.history.past(ids[c], round))
            self.history.record(ids[c], round, this_round[c])

        pos_rows, neg_rows = pack_pairs(pairs, hp.train.max_len, tok.pad_token_id)
        start = time.perf_counter()
        player_logps = score_pairs(
            policy.graphdef,
            policy.base_state,
            players,
            player_mask,
            pos_rows,
            neg_rows,
            2 * hp.train.batch_size,
        )
        score_s = time.perf_counter() - start
        counts = np.asarray([len(p) for p in pairs], np.float32)
        lr = round_lr(hp.train, round)
        batch = client_batch(
            pos_rows,
            lose=neg_rows,
            lr=lr,
            num_examples=counts,
            wins=correct,
            wrong=wrong,
            baseline=inputs.baselines,
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

    def fit_hparams(self, static_hp: PairHParams) -> HParams:
        """The shared local-training settings, ``hp.train``."""
        return static_hp.train

    @staticmethod
    def minibatch_loss(
        ctx: tr.LossContext, lora_state: nnx.State, batch_c: ClientBatch, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`pair_loss` on ``local.batch_size`` pairs of one client: one policy forward over
        their y⁺ and y⁻ rows; the players' log-probs are read from ``batch_c.players``."""
        hp = ctx.hp
        idx = tr.sample_rows(key, batch_c.train.valid, hp.train.batch_size)
        pos = tr.gather_rows(batch_c.train, idx)
        neg = tr.gather_rows(batch_c.lose, idx)
        b = idx.shape[0]
        tokens = jnp.concatenate([pos.tokens, neg.tokens])
        attention = jnp.concatenate([pos.attention_mask, neg.attention_mask])
        loss_mask = jnp.concatenate([pos.loss_mask, neg.loss_mask])
        logps = ctx.token_logps(lora_state, tokens, attention)
        seq = jnp.sum(jnp.where(loss_mask > 0, logps, 0.0), axis=-1)
        pol_pos, pol_neg = seq[:b], seq[b:]
        players = batch_c.players
        if players is None:
            raise ValueError("a pairwise ClientBatch needs the players' log-probs (players)")
        picked = PlayerLogps(pos=players.pos[:, idx], neg=players.neg[:, idx], mask=players.mask)
        loss, metrics = pair_loss(hp, pol_pos, pol_neg, picked, pos.valid)
        count = jnp.maximum(jnp.sum(pos.valid), 1).astype(jnp.float32)
        metrics = {
            **metrics,
            "logp_pos": jnp.sum(jnp.where(pos.valid, pol_pos, 0.0)) / count,
            "logp_neg": jnp.sum(jnp.where(pos.valid, pol_neg, 0.0)) / count,
        }
        return loss, metrics


def pair_loss(
    hp: PairHParams,
    pol_pos: jax.Array,
    pol_neg: jax.Array,
    players: PlayerLogps,
    mask: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``hp.kind`` loss of [B] policy log-probs against players' [J, B] log-probs."""
    if hp.kind == "tpaw":
        return tpaw_loss(
            pol_pos,
            pol_neg,
            players.pos,
            players.neg,
            players.mask,
            lam=hp.lam,
            eta=hp.eta,
            gamma=hp.gamma,
            mask=mask,
        )
    if hp.kind == "spin":
        return spin_loss(pol_pos, pol_neg, players.pos[0], players.neg[0], lam=hp.lam, mask=mask)
    return dpo_loss(
        pol_pos,
        pol_neg,
        players.pos[0],
        players.neg[0],
        beta=hp.beta,
        label_smoothing=hp.label_smoothing,
        mask=mask,
    )


__all__ = [
    "KINDS",
    "PairHParams",
    "PairwiseSelfPlay",
    "pair_loss",
]
