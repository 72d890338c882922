"""SPEAR (arXiv 2605.07977) and its feedback-SFT baseline as client algorithms.

Per client and round (reference ``client_spear_update`` in lee3296/SPEAR, spear.py):

1. one sample y0 per prompt; the simulated user judges it;
2. a wrong y0 gets up to ``max_revisions`` feedback-guided revisions: the prompt
   becomes the original conversation + the latest attempt + its feedback; only rows
   still wrong are re-generated, and each attempt is ONE batch across all clients;
3. traces: a correct y0 is a win; a successful revision is a win attached to the
   ORIGINAL prompt (so the model learns to answer right without feedback); a wrong y0
   is a lose with confidence 1.0 if a revision later succeeded, else 0.5
   (`fedsp.core.weighting.spear_confidence`);
4. lose traces are capped at ⌊ρ · wins⌋ by sampling without replacement;
5. ``local.steps`` AdamW steps, each on ``local.batch_size`` wins and as many loses,
   of `fedsp.core.losses.spear_loss`: likelihood on win completions (AWR-weighted when
   ``algorithm.awr_temperature`` > 0) + ``lambda_lose`` · confidence-weighted
   unlikelihood on the tail tokens of lose completions above ``margin`` (end-of-turn
   and protected format tokens excluded). A client without wins does not train (pure
   unlikelihood collapses the model): its adapter comes back unchanged and it reports
   ``num_examples`` 0; otherwise ``num_examples`` is its win count, FedAvg's weight.

``feedback_sft`` is the same with no lose term: likelihood on wins only.

Advantage weighting: each first answer's reward (1/0 verdict, or the feedback score
with ``algorithm.reward = "score"``) minus the client's baseline (an EMA of its past
rewards) gives the advantages; their mean is reported for the server's client weights.

Differences from the reference, on purpose: clients never share a parameter buffer
(its "average" is the last client's adapter), feedback never contains the gold answer
(``fedsp.data.feedback``), and completions are trained on the generated token ids
rather than re-tokenised text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.core.advantage import awr_weights
from fedsp.core.losses import spear_loss
from fedsp.core.weighting import spear_confidence
from fedsp.selfplay import packing, rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import ClientBatch, Collector, RoundInputs, client_batch
from fedsp.selfplay.hparams import HParams, round_lr
from fedsp.selfplay.registry import register_algorithm


def cap_loses(num_loses: int, num_wins: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the lose traces kept: all if at most ⌊ρ · wins⌋, else that many drawn
    without replacement (reference ``max_lose_ratio``), in their original order."""
    cap = int(rho * num_wins)
    if num_loses <= cap:
        return np.arange(num_loses)
    return np.sort(rng.choice(num_loses, size=cap, replace=False))


class Spear(Collector, tr.LocalTraining):
    """SPEAR (``name="spear"``) or feedback-SFT (``name="feedback_sft"``).

    Args:
      name: "spear" or "feedback_sft".
      config: a validated run config (`fedsp.config.default_config` schema).
      generate_fn: the rollout sampler (a `fedsp.selfplay.rollout.Rollout`),
        `fedsp.selfplay.rollout.sample_completions` by default; tests inject scripted
        completions here.
    """

    def __init__(self, name: str, config: Any, generate_fn: rollout.Rollout | None = None):
        if name not in ("spear", "feedback_sft"):
            raise ValueError(f"name must be 'spear' or 'feedback_sft', got {name!r}")
        self.name = name
        self.hp = HParams.from_config(config)
        self.sampling = rollout.SamplingParams.from_config(config)
        self.use_lose = name == "spear" and self.hp.lambda_lose > 0
        self.generate_fn = rollout.sample_completions if generate_fn is None else generate_fn

    # ------------------------------------------------------------------ host side

    def collect_batch(self, inputs: RoundInputs) -> tuple[ClientBatch, dict[str, float]]:
        """See `fedsp.selfplay.base.Algorithm.collect`."""
        policy, task, feedback, key, round = (
            inputs.policy,
            inputs.task,
            inputs.feedback,
            inputs.key,
            inputs.round,
        )
        hp, tok = self.hp, policy.tokenizer
        num_clients, prev = inputs.num_clients, inputs.baselines
        rows = [
            (c, i, ex) for c, exs in enumerate(inputs.client_examples) for i, ex in enumerate(exs)
        ]
        prompts = [rollout.prompt_ids(tok, task, ex) for _, _, ex in rows]

        # A revision prompt repeats the prompt and the first answer: keep the first
        # call's keys/values so the revisions prefill only the feedback turn.
        reuse = self.sampling.reuse_cache and hp.max_revisions > 0

        def sample(attempt: int, active: list[int], prompt_list: list[list[int]], **kw):
            keys = rollout.rollout_keys(
                key,
                round,
                attempt,
                [inputs.slot(rows[j][0]) for j in active],
                [rows[j][1] for j in active],
            )
            return self.generate_fn(
                policy, inputs.lora_state, prompt_list, keys, self.sampling, **kw
            )

        y0 = sample(0, list(range(len(rows))), prompts, **({"keep_cache": True} if reuse else {}))
        verdicts = [feedback(ex, y.text) for (_, _, ex), y in zip(rows, y0)]
        revised: dict[int, tuple[rollout.Completion, float]] = {}
        latest = {
            j: (y0[j].text, verdicts[j].text) for j, v in enumerate(verdicts) if not v.correct
        }
        pending = sorted(latest)
        generated = len(rows)
        for attempt in range(1, hp.max_revisions + 1):
            if not pending:
                break
            revision_prompts = [
                rollout.prompt_ids(
                    tok, task, rows[j][2], previous=latest[j][0], feedback=latest[j][1]
                )
                for j in pending
            ]
            resume = {"continue_from": [y0[j] for j in pending]} if reuse else {}
            outs = sample(attempt, pending, revision_prompts, **resume)
            generated += len(pending)
            still = []
            for j, y in zip(pending, outs):
                verdict = feedback(rows[j][2], y.text)
                if verdict.correct:
                    revised[j] = (y, verdict.score if hp.reward == "score" else 1.0)
                else:
                    latest[j] = (y.text, verdict.text)
                    still.append(j)
            pending = still

        rewards = [v.score if hp.reward == "score" else float(v.correct) for v in verdicts]
        wins: list[list[packing.Trace]] = [[] for _ in range(num_clients)]
        loses: list[list[packing.Trace]] = [[] for _ in range(num_clients)]
        stats = {
            k: np.zeros(num_clients, np.float32)
            for k in ("mean_advantage", "baseline", "wins", "wrong")
        }
        for c in range(num_clients):
            own = [j for j, row in enumerate(rows) if row[0] == c]
            b, stats["mean_advantage"][c], stats["baseline"][c] = packing.advantage_stats(
                [rewards[j] for j in own], prev[c], hp.baseline_decay
            )
            win_rewards = []
            for j in own:  # correct first answers first, then revisions (as the reference)
                if verdicts[j].correct:
                    wins[c].append(packing.Trace(prompts[j], y0[j].tokens))
                    win_rewards.append(rewards[j])
            for j in own:
                if j in revised:
                    wins[c].append(packing.Trace(prompts[j], revised[j][0].tokens))
                    win_rewards.append(revised[j][1])
            if hp.awr_temperature > 0 and win_rewards:
                base = 0.0 if np.isnan(b) else b
                w = np.asarray(
                    awr_weights(
                        jnp.asarray(win_rewards, jnp.float32) - base,
                        hp.awr_temperature,
                        hp.awr_max_weight,
                    )
                )
                wins[c] = [
                    packing.Trace(t.prompt, t.completion, float(x)) for t, x in zip(wins[c], w)
                ]
            wrong = [j for j in own if not verdicts[j].correct]
            confidence = np.asarray(spear_confidence(jnp.asarray([j in revised for j in wrong])))
            all_loses = [
                packing.Trace(prompts[j], y0[j].tokens, float(conf), tail_only=True)
                for j, conf in zip(wrong, confidence)
            ]
            rng = np.random.default_rng([*packing.key_words(key), round, c])
            kept = cap_loses(len(all_loses), len(wins[c]), hp.rho, rng)
            loses[c] = [all_loses[k] for k in kept] if self.use_lose else []
            stats["wins"][c], stats["wrong"][c] = len(wins[c]), len(wrong)

        pad = tok.pad_token_id
        lr = round_lr(hp, round)
        # A client has at most one win and one lose row per prompt: packing that many
        # rows whatever the round's outcome keeps S fixed, so training compiles once.
        most = max(sum(row[0] == c for row in rows) for c in range(num_clients))
        batch = client_batch(
            packing.pack(wins, hp.max_len, pad, min_rows=most),
            lose=(
                packing.pack(
                    loses,
                    hp.max_len,
                    pad,
                    min_rows=most,
                    end_ids=tok.eos_token_ids,
                    protected_ids=packing.protected_token_ids(tok, hp.protected_strings),
                    tail_tokens=hp.tail_tokens,
                )
                if self.use_lose
                else None
            ),
            lr=lr,
            num_examples=stats["wins"],
            mean_advantage=stats["mean_advantage"],
            baseline=stats["baseline"],
            wins=stats["wins"],
            wrong=stats["wrong"],
        )
        first_correct = float(np.mean([v.correct for v in verdicts])) if verdicts else 0.0
        metrics = {
            "rollout/first_accuracy": first_correct,
            "rollout/revised": float(len(revised)),
            "rollout/revision_success": len(revised)
            / max(1, len(rows) - sum(v.correct for v in verdicts)),
            "rollout/generated": float(generated),
            "rollout/wins": float(stats["wins"].sum()),
            "rollout/wrong": float(stats["wrong"].sum()),
            "rollout/loses_kept": float(sum(len(x) for x in loses)),
            "lr": lr,
        }
        return batch, metrics

    def static_hparams(self) -> HParams:
        """`HParams.static`, with no unlikelihood term for feedback-SFT."""
        hp = self.hp.static()
        return hp if self.use_lose else dataclasses.replace(hp, lambda_lose=0.0)

    @staticmethod
    def minibatch_loss(
        ctx: tr.LossContext, lora_state: nnx.State, batch_c: ClientBatch, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`spear_loss` on one minibatch of ``hp.batch_size`` wins (and as many loses,
        unless ``hp.lambda_lose`` is 0) of one client."""
        hp = ctx.hp
        use_lose = hp.lambda_lose > 0
        k_win, k_lose = jax.random.split(key)
        win = tr.gather_rows(
            batch_c.train, tr.sample_rows(k_win, batch_c.train.valid, hp.batch_size)
        )
        win_logps = ctx.token_logps(lora_state, win.tokens, win.attention_mask)
        if use_lose:
            lose = tr.gather_rows(
                batch_c.lose, tr.sample_rows(k_lose, batch_c.lose.valid, hp.batch_size)
            )
            lose_logps = ctx.token_logps(lora_state, lose.tokens, lose.attention_mask)
            lose_mask, confidence = lose.loss_mask, lose.weight
        else:
            lose_logps = lose_mask = jnp.zeros((1, 1), jnp.float32)
            confidence = jnp.zeros((1,), jnp.float32)
        return spear_loss(
            win_logps,
            win.loss_mask,
            lose_logps,
            lose_mask,
            confidence,
            lambda_win=hp.lambda_win,
            lambda_lose=hp.lambda_lose,
            margin=hp.margin,
            win_weights=win.weight,
        )


register_algorithm("spear", lambda config: Spear("spear", config))
register_algorithm("feedback_sft", lambda config: Spear("feedback_sft", config))
