"""Helpers for the pairwise self-play tests (SPIN, TPAW, DPO)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedsp.selfplay import packing
from fedsp.selfplay import train as tr
from fedsp.selfplay.rollout import Completion


class FixedReplies:
    """``generate_fn`` answering each prompt with ``replies[question]`` (a str, or a list
    indexed by the round's call count for that question); ``calls`` counts batches."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls, self.seen = tokenizer, replies, 0, {}
        self.end = packing.end_of_turn_id(tokenizer)

    def __call__(
        self, policy, lora_state, prompts, keys, params, *, keep_cache=False, continue_from=None
    ):
        assert keys.shape == (len(prompts),)
        self.calls += 1
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            (question,) = [q for q in self.replies if q in text]
            reply = self.replies[question]
            if not isinstance(reply, str):
                n = self.seen.get(question, 0)
                self.seen[question] = n + 1
                reply = reply[n]
            tokens = np.asarray([*self.tokenizer.encode(reply), self.end], np.int32)
            out.append(Completion(tokens, np.zeros(len(tokens), np.float32), reply))
        return out


@functools.partial(jax.jit, static_argnums=0)
def _seq_logps(graphdef, lora, base, tokens, attention, loss_mask):
    logps = tr.sequence_token_logps(graphdef, lora, base, tokens, attention)
    return jnp.sum(jnp.where(loss_mask > 0, logps, 0.0), axis=-1)


def sequence_logps(graphdef, lora, base, seqs) -> np.ndarray:
    """[C, S] sequence log-probs of packed rows under ``lora`` (0 on invalid rows), one
    row at a time: an oracle independent of the batched scorer."""
    c, s, _t = seqs.tokens.shape
    out = np.zeros((c, s), np.float64)
    for ci in range(c):
        for si in range(s):
            if bool(seqs.valid[ci, si]):
                out[ci, si] = float(
                    _seq_logps(
                        graphdef,
                        lora,
                        base,
                        seqs.tokens[ci, si][None],
                        seqs.attention_mask[ci, si][None],
                        seqs.loss_mask[ci, si][None],
                    )[0]
                )
    return out


def perturbed(lora, seed: int, scale: float = 0.05):
    """A different adapter: ``lora`` plus seeded noise (a stand-in for a trained player)."""
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    # x + scale · normal(k, x.shape), drawn at one size and sliced (the same numbers:
    # threefry draws are a function of the flat index): eager normal compiles per shape.
    size = max(x.size for x in leaves)
    noise = [
        np.asarray(jax.random.normal(k, (size,)))[: x.size].reshape(x.shape)
        for k, x in zip(keys, leaves)
    ]
    return jax.tree.unflatten(
        treedef, [jnp.asarray(np.asarray(x) + np.float32(scale) * n) for n, x in zip(noise, leaves)]
    )


def pair_loss(algo, graphdef, base, lora, batch_c, key):
    """``algo``'s minibatch loss (and metrics) of ``lora`` on one client's batch."""
    ctx = tr.LossContext(graphdef, algo.static_hparams(), base, lora)
    return type(algo).minibatch_loss(ctx, lora, batch_c, key)


def client(batch, c: int = 0):
    """One client's slice of a stacked ClientBatch."""
    return jax.tree.map(lambda x: x[c], batch)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]
