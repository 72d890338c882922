"""Supervised fine-tuning on gold answers as a federated client baseline.

No generation: each of the round's examples becomes one trace, the chat-formatted
prompt followed by the gold completion (``example.gold_response``, else the gold
answer in the task's answer format, `fedsp.selfplay.train.gold_completion`) and the
chat template's end-of-turn token, trained by token-mean likelihood
(`fedsp.core.losses.sft_loss`) for ``local.steps`` AdamW steps. No reward is observed,
so advantages are 0 and baselines are carried over unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from fedsp.core.losses import sft_loss
from fedsp.selfplay import packing, rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import ClientBatch, Collector, RoundInputs, client_batch
from fedsp.selfplay.hparams import HParams, round_lr
from fedsp.selfplay.registry import register_algorithm


class Sft(Collector, tr.LocalTraining):
    """SFT client; see the module docstring."""

    def __init__(self, name: str, config: Any):
        self.name = name
        self.hp = HParams.from_config(config)

    def collect_batch(self, inputs: RoundInputs) -> tuple[ClientBatch, dict[str, float]]:
        """See `fedsp.selfplay.base.Algorithm.collect` (``feedback`` and ``key`` unused)."""
        task, tok = inputs.task, inputs.policy.tokenizer
        end = packing.end_of_turn_id(tok)
        traces = [
            [
                packing.Trace(
                    rollout.prompt_ids(tok, task, ex),
                    [*tok.encode(packing.gold_completion(task, ex)), end],
                )
                for ex in exs
            ]
            for exs in inputs.client_examples
        ]
        counts = np.asarray([len(t) for t in traces], np.float32)
        lr = round_lr(self.hp, inputs.round)
        batch = client_batch(
            packing.pack(traces, self.hp.max_len, tok.pad_token_id),
            lr=lr,
            num_examples=counts,
            wins=counts,
            baseline=inputs.baselines,
        )
        return batch, {"lr": lr, "sft/examples": float(counts.sum())}

    @staticmethod
    def minibatch_loss(
        ctx: tr.LossContext, lora_state: nnx.State, batch_c: ClientBatch, key: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`sft_loss` on ``hp.batch_size`` gold sequences of one client."""
        rows = tr.gather_rows(
            batch_c.train, tr.sample_rows(key, batch_c.train.valid, ctx.hp.batch_size)
        )
        logps = ctx.token_logps(lora_state, rows.tokens, rows.attention_mask)
        loss, metrics = sft_loss(logps, rows.loss_mask)
        return loss, {"loss": loss, "nll": metrics["nll"]}


register_algorithm("sft", lambda config: Sft("sft", config))
