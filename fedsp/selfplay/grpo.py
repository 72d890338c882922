"""GRPO (Shao et al. 2024, arXiv 2402.03300) as a federated client baseline.

Per client and round: G samples per prompt (all clients' prompts × G in ONE batched
generation, each sample with its own key), rewards from the simulated user (1/0
verdict, or the feedback score), group-relative advantages
(`fedsp.core.advantage.group_advantages`), then ``local.steps`` AdamW steps of
`fedsp.core.losses.grpo_loss` on minibatches of samples. The old (sampling) and the
reference policy are both the round-start adapter: the clipped ratio and the k3 KL are
taken against the log-probs the round's server adapter gives each minibatch, recomputed
by the same forward pass as the trained log-probs, so the first step has ratio 1 and
KL 0 exactly up to float rounding.

The SPEAR reference's GRPO regenerates samples at every local step; here one rollout
per round feeds all local steps (the usual PPO-style reuse), which is what lets every
client's rollout share one batched generation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.core.advantage import group_advantages
from fedsp.core.losses import grpo_loss
from fedsp.selfplay import packing, rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import ClientBatch, Collector, RoundInputs, client_batch
from fedsp.selfplay.hparams import HParams, round_lr
from fedsp.selfplay.registry import register_algorithm


class Grpo(Collector, tr.LocalTraining):
    """GRPO client; see the module docstring.

    Args:
      name: "grpo".
      config: a validated run config (``algorithm.group_size``, ``clip_eps``, ``kl_coef``, ...).
      generate_fn: the rollout sampler (default `fedsp.selfplay.rollout.sample_completions`).
    """

    def __init__(self, name: str, config: Any, generate_fn: rollout.Rollout | None = None):
        self.name = name
        self.hp = HParams.from_config(config)
        self.sampling = rollout.SamplingParams.from_config(config)
        self.generate_fn = rollout.sample_completions if generate_fn is None else generate_fn

    def collect_batch(self, inputs: RoundInputs) -> tuple[ClientBatch, dict[str, float]]:
        """See `fedsp.selfplay.base.Algorithm.collect`."""
        policy, task, key, round = inputs.policy, inputs.task, inputs.key, inputs.round
        hp, tok, g = self.hp, policy.tokenizer, self.hp.group_size
        num_clients, prev = inputs.num_clients, inputs.baselines
        prompts_by_row = []
        rows = []  # (client, prompt index, sample index, example)
        for c, exs in enumerate(inputs.client_examples):
            for i, ex in enumerate(exs):
                ids = rollout.prompt_ids(tok, task, ex)
                for s in range(g):
                    rows.append((c, i, s, ex))
                    prompts_by_row.append(ids)
        keys = rollout.rollout_keys(
            key,
            round,
            0,
            [inputs.slot(r[0]) for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
        )
        outs = self.generate_fn(policy, inputs.lora_state, prompts_by_row, keys, self.sampling)
        verdicts = [inputs.feedback(r[3], y.text) for r, y in zip(rows, outs)]
        rewards = np.asarray(
            [v.score if hp.reward == "score" else float(v.correct) for v in verdicts], np.float32
        )

        traces: list[list[packing.Trace]] = [[] for _ in range(num_clients)]
        stats = {
            k: np.zeros(num_clients, np.float32)
            for k in ("mean_advantage", "baseline", "wins", "wrong", "num_examples")
        }
        for c in range(num_clients):
            own = [j for j, r in enumerate(rows) if r[0] == c]
            if not own:
                stats["baseline"][c] = prev[c]
                continue
            r_c = rewards[own]
            adv = np.asarray(group_advantages(jnp.asarray(r_c.reshape(-1, g)))).ravel()
            for j, a in zip(own, adv):
                traces[c].append(packing.Trace(prompts_by_row[j], outs[j].tokens, float(a)))
            _, stats["mean_advantage"][c], stats["baseline"][c] = packing.advantage_stats(
                r_c, prev[c], hp.baseline_decay
            )
            correct = np.asarray([verdicts[j].correct for j in own])
            stats["wins"][c], stats["wrong"][c] = correct.sum(), (~correct).sum()
            stats["num_examples"][c] = len(own)
        lr = round_lr(hp, round)
        batch = client_batch(
            packing.pack(traces, hp.max_len, tok.pad_token_id),
            lr=lr,
            num_examples=stats["num_examples"],
            mean_advantage=stats["mean_advantage"],
            baseline=stats["baseline"],
            wins=stats["wins"],
            wrong=stats["wrong"],
        )
        metrics = {
            "rollout/accuracy": float(np.mean([v.correct for v in verdicts])) if rows else 0.0,
            "rollout/mean_reward": float(rewards.mean()) if rows else 0.0,
            "rollout/generated": float(len(rows)),
            "lr": lr,
        }
        return batch, metrics

    @staticmethod
    def minibatch_loss(
        ctx: tr.LossContext, lora_state: nnx.State, batch_c: ClientBatch, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`grpo_loss` on ``hp.batch_size`` samples of one client; old = ref = θ_r
        (``ctx.start_state``)."""
        hp = ctx.hp
        rows = tr.gather_rows(
            batch_c.train, tr.sample_rows(key, batch_c.train.valid, hp.batch_size)
        )
        logps = ctx.token_logps(lora_state, rows.tokens, rows.attention_mask)
        start_logps = jax.lax.stop_gradient(
            ctx.token_logps(ctx.start_state, rows.tokens, rows.attention_mask)
        )
        return grpo_loss(
            logps,
            start_logps,
            start_logps,
            rows.weight,
            rows.loss_mask,
            clip_eps=hp.clip_eps,
            kl_coef=hp.kl_coef,
        )


register_algorithm("grpo", lambda config: Grpo("grpo", config))
