"""Players' sequence log-probs of every pair, computed once per round without gradient.

A player is a frozen policy a pairwise loss compares against (SPIN's opponent, TPAW's
team of pool checkpoints, DPO's reference): the shared base plus its adapters. Every
response is scored ONE forward per real player, batched over all clients, and every
local step then reuses the scores (`fedsp.selfplay.base.PlayerLogps`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.distributed import to_host
from fedsp.model.sharding import padded_rows, shard_rows
from fedsp.selfplay import packing, train
from fedsp.selfplay.base import PackedSequences, PlayerLogps
from fedsp.selfplay.opponents import Pair


def _sequence_logps(graphdef, lora_state, base_state, tokens, attention_mask, loss_mask):
    """[N] Σ over ``loss_mask`` of the token log-probs under one player's adapters."""
    logps = train.sequence_token_logps(graphdef, lora_state, base_state, tokens, attention_mask)
    return jnp.sum(jnp.where(loss_mask > 0, logps, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _score_chunk(graphdef, players, player_mask, base_state, tokens, attention_mask, loss_mask):
    """[J, R] scores of one R-row chunk under every player of the stack [J, ...].

    A sequential map over the J slots; a masked slot takes the other branch of a
    ``lax.cond`` (0, no forward). One compiled program serves every round whatever the
    number of real players and of rows, so a filling pool or growing opponent data
    compiles nothing new.
    """

    # Rows are independent: under a mesh they run data parallel over "clients".
    tokens, attention_mask, loss_mask = (shard_rows(x) for x in (tokens, attention_mask, loss_mask))

    def per_player(slot):
        adapters, real = slot
        return jax.lax.cond(
            real,
            lambda: _sequence_logps(
                graphdef, adapters, base_state, tokens, attention_mask, loss_mask
            ),
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
      tokens, attention_mask, loss_mask: [N, T] rows (`PackedSequences` fields, flattened).
      batch_size: rows per forward.
    """
    player_mask = np.asarray(player_mask, bool)
    n = tokens.shape[0]
    if n == 0 or not player_mask.any():
        return np.zeros((player_mask.shape[0], n), np.float32)
    # At least a row per device of the mesh's clients axis: fewer would run replicated.
    chunk = padded_rows(min(batch_size, 1 << (n - 1).bit_length()))
    padded = -(-n // chunk) * chunk
    fill = np.zeros(padded - n, np.int64)
    rows = [
        np.concatenate([np.asarray(x), np.asarray(x)[fill]])
        for x in (tokens, attention_mask, loss_mask)
    ]
    mask = jnp.asarray(player_mask)
    parts = [
        _score_chunk(graphdef, players, mask, base_state, *(x[s : s + chunk] for x in rows))
        for s in range(0, padded, chunk)
    ]
    return np.concatenate(to_host(parts), axis=1)[:, :n]


def _widen(seqs: PackedSequences, width: int, pad_id: int) -> PackedSequences:
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
) -> tuple[PackedSequences, PackedSequences]:
    """(y⁺ rows, y⁻ rows) as [C, S, T] with row s of one paired with row s of the other."""
    pos = packing.pack(
        [[packing.Trace(p.prompt, p.pos) for p in c] for c in pairs], max_len, pad_id
    )
    neg = packing.pack(
        [[packing.Trace(p.prompt, p.neg) for p in c] for c in pairs], max_len, pad_id
    )
    width = max(pos.tokens.shape[-1], neg.tokens.shape[-1])
    return _widen(pos, width, pad_id), _widen(neg, width, pad_id)


def score_pairs(
    graphdef: nnx.GraphDef,
    base_state: nnx.State,
    players: Any,
    player_mask: np.ndarray,
    pos: PackedSequences,
    neg: PackedSequences,
    batch_size: int,
) -> PlayerLogps:
    """Every valid pair's y⁺ and y⁻ scored by every real player: `PlayerLogps` [C, J, S]."""
    c, s, t = pos.tokens.shape
    valid = np.asarray(pos.valid).reshape(-1)
    flat = lambda x: np.asarray(x).reshape(c * s, t)[valid]  # noqa: E731
    tokens = np.concatenate([flat(pos.tokens), flat(neg.tokens)])
    attention = np.concatenate([flat(pos.attention_mask), flat(neg.attention_mask)])
    loss_mask = np.concatenate([flat(pos.loss_mask), flat(neg.loss_mask)])
    scores = score_sequences(
        graphdef, base_state, players, player_mask, tokens, attention, loss_mask, batch_size
    )
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
