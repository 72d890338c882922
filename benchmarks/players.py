"""TPAW player log-probs: computed once per round vs recomputed inside the loss.

    python -m benchmarks.players                        # the figures in BENCHMARKS.md
    python -m benchmarks.players --model smollm2 --pairs 8 --steps 6 --tokens 256
    python -m benchmarks.players --json out.json

One client's TPAW round on S pairs (2S responses) with J players, ``--steps`` local
AdamW steps of ``--batch`` pairs each, both ways:

- once per round (fedsp, `fedsp.selfplay.pairs`): `score_pairs` runs ONE forward per
  player per response, without gradient, in chunks of 2 × batch rows; every local step
  then runs one forward + backward of the trained policy on its 2 × batch rows and reads
  the stored player log-probs;
- naive: every local step also recomputes the J players' log-probs of its minibatch
  inside the loss (under ``stop_gradient``), as a direct port of a PyTorch trainer that
  calls the reference models in ``compute_loss`` does.

Both give the same adapters (checked: max |Δ| is printed). Forward counts are in rows of
T tokens: once = J·2S (+ steps·2B for the policy), naive = steps·2B·(J + 1). The
once-per-round path wins as soon as each pair is visited more than once per round
(steps·B > S, i.e. more than one epoch: SPIN's recipe trains 3 epochs per iteration).
Every figure is the median of ``--repeats`` timed calls after a warm-up call that holds
the compilation.

Models: ``tiny`` (default) is a random Llama-family model (``--layers``/``--hidden``/
``--vocab``), ``smollm2`` the default SmolLM2-135M-Instruct asset. Token ids are random;
the second half of every row is the response (loss mask).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp import hostalloc
from fedsp.config import default_config
from fedsp.model.config import ModelConfig
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.transformer import Transformer
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import PackedSequences, PlayerLogps, client_batch
from fedsp.selfplay.pairs import PairHParams, PairwiseSelfPlay, pair_loss
from fedsp.selfplay.players import score_pairs, stack_players


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first-call seconds, median of ``repeats`` further calls, last result)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def build_model(args) -> tuple[nnx.GraphDef, nnx.State, nnx.State, int]:
    if args.model == "smollm2":
        from fedsp.assets import default_model_path
        from fedsp.model import from_pretrained

        model, _ = from_pretrained(default_model_path())
    else:
        hf = dict(
            model_type="llama",
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            num_key_value_heads=max(1, args.hidden // 128),
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            rope_theta=1e5,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=8, alpha=16.0), rngs=nnx.Rngs(1))
    graphdef, lora, base = split_lora(model)
    return graphdef, lora, base, model.config.vocab_size


def random_pairs(
    num_pairs: int, tokens: int, vocab: int, seed: int = 0
) -> tuple[PackedSequences, PackedSequences]:
    """[1, S, T] y⁺ and y⁻ rows sharing their prompt (first half)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, vocab, (num_pairs, tokens // 2))

    def rows():
        ids = np.concatenate([prompt, rng.integers(3, vocab, (num_pairs, tokens - tokens // 2))], 1)
        mask = np.zeros((num_pairs, tokens), np.float32)
        mask[:, tokens // 2 :] = 1.0
        return PackedSequences(
            tokens=jnp.asarray(ids[None], jnp.int32),
            attention_mask=jnp.ones((1, num_pairs, tokens), bool),
            loss_mask=jnp.asarray(mask[None]),
            weight=jnp.ones((1, num_pairs), jnp.float32),
            valid=jnp.ones((1, num_pairs), bool),
        )

    return rows(), rows()


def naive_minibatch_loss(graphdef, hp, base, players, player_mask, lora, batch_c, key):
    """The TPAW minibatch loss with the players' log-probs recomputed on every call."""
    idx = tr.sample_rows(key, batch_c.train.valid, hp.train.batch_size)
    pos, neg = tr.gather_rows(batch_c.train, idx), tr.gather_rows(batch_c.lose, idx)
    b = idx.shape[0]
    tokens = jnp.concatenate([pos.tokens, neg.tokens])
    attention = jnp.concatenate([pos.attention_mask, neg.attention_mask])
    loss_mask = jnp.concatenate([pos.loss_mask, neg.loss_mask])

    def seq_logps(adapters):
        logps = tr.sequence_token_logps(graphdef, adapters, base, tokens, attention)
        return jnp.sum(jnp.where(loss_mask > 0, logps, 0.0), axis=-1)

    seq = seq_logps(lora)
    ref = jax.lax.stop_gradient(jax.lax.map(seq_logps, players))  # [J, 2B]: J forwards
    picked = PlayerLogps(pos=ref[:, :b], neg=ref[:, b:], mask=player_mask)
    return pair_loss(hp, seq[:b], seq[b:], picked, pos.valid)


@functools.partial(jax.jit, static_argnums=(0, 1))
def naive_local_train(graphdef, hp, base, players, player_mask, lora, batch_c, key):
    loss_fn = functools.partial(naive_minibatch_loss, graphdef, hp, base, players, player_mask)
    return tr.fit(lambda params, k: loss_fn(params, batch_c, k), lora, key, batch_c.lr, hp.train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--pairs", type=int, default=16, help="S pairs (2S responses)")
    parser.add_argument("--tokens", type=int, default=128, help="T tokens per row")
    parser.add_argument("--batch", type=int, default=4, help="pairs per local step")
    parser.add_argument("--steps", type=int, default=12, help="local steps per round")
    parser.add_argument("--players", type=int, default=3, help="J players")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    graphdef, lora, base, vocab = build_model(args)
    team = [
        jax.tree.map(lambda x, s=s: x + 0.02 * jax.random.normal(jax.random.key(s), x.shape), lora)
        for s in range(args.players)
    ]
    players, mask = stack_players(*team)
    pos, neg = random_pairs(args.pairs, args.tokens, vocab)
    config = default_config()
    config.local.steps, config.local.batch_size, config.local.lr = args.steps, args.batch, 1e-3
    hp = PairHParams.from_config("tpaw", config, opponent_rounds=3).static()
    key = jax.random.key(0)

    def batch_with(player_logps):
        return client_batch(
            pos,
            lose=neg,
            lr=1e-3,
            num_examples=[args.pairs],
            baseline=[0.0],
            wins=[0.0],
            players=player_logps,
        )

    one = lambda b: jax.tree.map(lambda x: x[0], b)  # noqa: E731

    score_first, score_s, logps = timed(
        lambda: score_pairs(graphdef, base, players, mask, pos, neg, 2 * args.batch).pos,
        args.repeats,
    )
    logps = score_pairs(graphdef, base, players, mask, pos, neg, 2 * args.batch)
    batch_c = one(batch_with(logps))
    train_first, train_s, (once_lora, _) = timed(
        lambda: tr.local_train(
            PairwiseSelfPlay.minibatch_loss, graphdef, hp, hp.train, base, lora, batch_c, key
        ),
        args.repeats,
    )
    naive_batch = one(batch_with(None))
    naive_first, naive_s, (naive_lora, _) = timed(
        lambda: naive_local_train(
            graphdef, hp, base, players, jnp.asarray(mask), lora, naive_batch, key
        ),
        args.repeats,
    )
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(once_lora), jax.tree.leaves(naive_lora))
    )

    rows_2s, rows_step = 2 * args.pairs, 2 * args.batch
    result = {
        "model": args.model
        if args.model == "smollm2"
        else f"tiny ({args.layers} layers, d={args.hidden}, vocab {args.vocab})",
        "players": args.players,
        "pairs": args.pairs,
        "tokens": args.tokens,
        "batch": args.batch,
        "steps": args.steps,
        "once_player_forward_rows": args.players * rows_2s,
        "naive_player_forward_rows": args.players * rows_step * args.steps,
        "once_score_s": score_s,
        "once_train_s": train_s,
        "once_round_s": score_s + train_s,
        "naive_round_s": naive_s,
        "speedup": naive_s / (score_s + train_s),
        "first_call_s": {"score": score_first, "train": train_first, "naive": naive_first},
        "max_abs_adapter_diff": diff,
    }
    print(
        f"model {result['model']}, J={args.players}, S={args.pairs} pairs × 2 × "
        f"T={args.tokens}, {args.steps} steps of {args.batch} pairs"
    )
    print("| | player forwards (rows) | score (s) | local steps (s) | round (s) |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| once per round | {result['once_player_forward_rows']} | {score_s:.2f} | "
        f"{train_s:.2f} | {score_s + train_s:.2f} |"
    )
    print(
        f"| naive (in the loss) | {result['naive_player_forward_rows']} | — | {naive_s:.2f} | "
        f"{naive_s:.2f} |"
    )
    print(f"speedup {result['speedup']:.2f}×; max |adapter difference| {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    hostalloc.reexec_with_tunables()  # before any work: see fedsp/hostalloc.py
    main()
