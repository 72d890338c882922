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

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.core.advantage import awr_weights
from fedsp.core.losses import spear_loss
from fedsp.core.weighting import spear_confidence
from fedsp.data.base import Example, Task
from fedsp.data.feedback import FeedbackProvider
from fedsp.selfplay import rollout
from fedsp.selfplay import train as tr
from fedsp.selfplay.base import ClientBatch, Policy, register_algorithm

GenerateFn = Callable[
    [Policy, nnx.State, Sequence[Sequence[int]], jax.Array, rollout.SamplingParams],
    list[rollout.Completion],
]


def _takes_cache_options(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts ``keep_cache`` and ``continue_from`` keywords."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return (any(p.kind is p.VAR_KEYWORD for p in params)
            or {"keep_cache", "continue_from"} <= names)


def cap_loses(num_loses: int, num_wins: int, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the lose traces kept: all if at most ⌊ρ · wins⌋, else that many drawn
    without replacement (reference ``max_lose_ratio``), in their original order."""
    cap = int(rho * num_wins)
    if num_loses <= cap:
        return np.arange(num_loses)
    return np.sort(rng.choice(num_loses, size=cap, replace=False))


@register_algorithm("spear")
@register_algorithm("feedback_sft")
class Spear:
    """SPEAR (``name="spear"``) or feedback-SFT (``name="feedback_sft"``).

    Args:
      name: "spear" or "feedback_sft".
      config: the run config (``algorithm``, ``rollout``, ``local``, ``fl`` sections).
      generate_fn: the rollout sampler, `fedsp.selfplay.rollout.generate` by default;
        tests inject scripted completions here. One that also takes `rollout.generate`'s
        ``keep_cache`` and ``continue_from`` keywords (or ``**kwargs``) gets them, so its
        revisions can reuse the first answers' keys/values; one with only the five
        positional arguments is called with those alone (no reuse).
    """

    def __init__(self, name: str, config: Any, generate_fn: GenerateFn | None = None):
        if name not in ("spear", "feedback_sft"):
            raise ValueError(f"name must be 'spear' or 'feedback_sft', got {name!r}")
        self.name = name
        self.hp = tr.HParams.from_config(config)
        self.sampling = tr.sampling_params(config)
        self.use_lose = name == "spear" and self.hp.lambda_lose > 0
        self.generate_fn = rollout.generate if generate_fn is None else generate_fn
        self._cache_options = _takes_cache_options(self.generate_fn)

    # ------------------------------------------------------------------ host side

    def collect(
        self,
        policy: Policy,
        lora_state: nnx.State,
        client_examples: Sequence[Sequence[Example]],
        task: Task,
        feedback: FeedbackProvider,
        key: jax.Array,
        round: int,
        *,
        baselines: Sequence[float] | np.ndarray | None = None,
    ) -> tuple[ClientBatch, dict[str, float]]:
        """See `fedsp.selfplay.base.Algorithm.collect`."""
        hp, tok = self.hp, policy.tokenizer
        num_clients = len(client_examples)
        if num_clients == 0:
            raise ValueError("client_examples is empty: no client was sampled")
        prev = tr.prev_baselines(baselines, num_clients)
        rows = [(c, i, ex) for c, exs in enumerate(client_examples) for i, ex in enumerate(exs)]
        prompts = [rollout.prompt_ids(tok, task, ex) for _, _, ex in rows]

        # A revision prompt repeats the prompt and the first answer: keep the first
        # call's keys/values so the revisions prefill only the feedback turn.
        reuse = self.sampling.reuse_cache and hp.max_revisions > 0 and self._cache_options

        def sample(attempt: int, active: list[int], prompt_list: list[list[int]], **kw):
            keys = rollout.row_keys(key, round, attempt, [rows[j][0] for j in active],
                                    [rows[j][1] for j in active])
            return self.generate_fn(policy, lora_state, prompt_list, keys, self.sampling, **kw)

        y0 = sample(0, list(range(len(rows))), prompts, **({"keep_cache": True} if reuse else {}))
        verdicts = [feedback(ex, y.text) for (_, _, ex), y in zip(rows, y0)]
        revised: dict[int, tuple[rollout.Completion, float]] = {}
        latest = {j: (y0[j].text, verdicts[j].text) for j, v in enumerate(verdicts)
                  if not v.correct}
        pending = sorted(latest)
        generated = len(rows)
        for attempt in range(1, hp.max_revisions + 1):
            if not pending:
                break
            revision_prompts = [
                rollout.prompt_ids(tok, task, rows[j][2], previous=latest[j][0],
                                   feedback=latest[j][1])
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
        wins: list[list[tr.Trace]] = [[] for _ in range(num_clients)]
        loses: list[list[tr.Trace]] = [[] for _ in range(num_clients)]
        stats = {k: np.zeros(num_clients, np.float32)
                 for k in ("mean_advantage", "baseline", "wins", "losses")}
        for c in range(num_clients):
            own = [j for j, row in enumerate(rows) if row[0] == c]
            b, stats["mean_advantage"][c], stats["baseline"][c] = tr.advantage_stats(
                [rewards[j] for j in own], prev[c], hp.baseline_decay)
            win_rewards = []
            for j in own:  # correct first answers first, then revisions (as the reference)
                if verdicts[j].correct:
                    wins[c].append(tr.Trace(prompts[j], y0[j].tokens))
                    win_rewards.append(rewards[j])
            for j in own:
                if j in revised:
                    wins[c].append(tr.Trace(prompts[j], revised[j][0].tokens))
                    win_rewards.append(revised[j][1])
            if hp.awr_temperature > 0 and win_rewards:
                base = 0.0 if np.isnan(b) else b
                w = np.asarray(awr_weights(jnp.asarray(win_rewards, jnp.float32) - base,
                                           hp.awr_temperature, hp.awr_max_weight))
                wins[c] = [tr.Trace(t.prompt, t.completion, float(x)) for t, x in zip(wins[c], w)]
            wrong = [j for j in own if not verdicts[j].correct]
            confidence = np.asarray(spear_confidence(jnp.asarray([j in revised for j in wrong])))
            all_loses = [tr.Trace(prompts[j], y0[j].tokens, float(conf), tail_only=True)
                         for j, conf in zip(wrong, confidence)]
            rng = np.random.default_rng([*tr.key_words(key), round, c])
            kept = cap_loses(len(all_loses), len(wins[c]), hp.rho, rng)
            loses[c] = [all_loses[k] for k in kept] if self.use_lose else []
            stats["wins"][c], stats["losses"][c] = len(wins[c]), len(wrong)

        pad = tok.pad_token_id
        train_seqs = tr.pack(wins, hp.max_len, pad)
        lose_seqs = (
            tr.pack(loses, hp.max_len, pad, end_ids=tok.eos_token_ids,
                    protected_ids=tr.protected_token_ids(tok, hp.protected_strings),
                    tail_tokens=hp.tail_tokens)
            if self.use_lose else tr.empty_sequences(num_clients)
        )
        lr = tr.round_lr(hp, round)
        batch = ClientBatch(
            train=train_seqs,
            lose=lose_seqs,
            lr=jnp.full((num_clients,), lr, jnp.float32),
            num_examples=jnp.asarray(stats["wins"]),
            mean_advantage=jnp.asarray(stats["mean_advantage"]),
            baseline=jnp.asarray(stats["baseline"]),
            wins=jnp.asarray(stats["wins"]),
            losses=jnp.asarray(stats["losses"]),
        )
        first_correct = float(np.mean([v.correct for v in verdicts])) if verdicts else 0.0
        metrics = {
            "rollout/first_accuracy": first_correct,
            "rollout/revised": float(len(revised)),
            "rollout/revision_success": len(revised) / max(1, len(rows) - sum(
                v.correct for v in verdicts)),
            "rollout/generated": float(generated),
            "rollout/wins": float(stats["wins"].sum()),
            "rollout/losses": float(stats["losses"].sum()),
            "rollout/loses_kept": float(sum(len(x) for x in loses)),
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
        return _spear_local_train(graphdef, self.hp.static(), self.use_lose, base_state, lora_state,
                                  batch_c, key_c)


def spear_minibatch_loss(
    graphdef: nnx.GraphDef,
    hp: tr.HParams,
    use_lose: bool,
    base_state: nnx.State,
    lora_state: nnx.State,
    batch_c: ClientBatch,
    key: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`spear_loss` on one minibatch of ``hp.batch_size`` wins (and loses) of one client."""
    k_win, k_lose = jax.random.split(key)
    win = tr.gather_rows(batch_c.train, tr.sample_rows(k_win, batch_c.train.valid,
                                                       hp.batch_size))
    win_logps = tr.sequence_token_logps(graphdef, lora_state, base_state, win.tokens,
                                        win.attention_mask)
    if use_lose:
        lose = tr.gather_rows(batch_c.lose, tr.sample_rows(k_lose, batch_c.lose.valid,
                                                           hp.batch_size))
        lose_logps = tr.sequence_token_logps(graphdef, lora_state, base_state, lose.tokens,
                                             lose.attention_mask)
        lose_mask, confidence = lose.loss_mask, lose.weight
    else:
        lose_logps = lose_mask = jnp.zeros((1, 1), jnp.float32)
        confidence = jnp.zeros((1,), jnp.float32)
    return spear_loss(
        win_logps, win.loss_mask, lose_logps, lose_mask, confidence,
        lambda_win=hp.lambda_win, lambda_lose=hp.lambda_lose if use_lose else 0.0,
        margin=hp.margin, win_weights=win.weight,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _spear_local_train(graphdef, hp, use_lose, base_state, lora_state, batch_c, key_c):
    loss_fn = functools.partial(spear_minibatch_loss, graphdef, hp, use_lose, base_state)
    trained, metrics = tr.fit(lambda lora, k: loss_fn(lora, batch_c, k), lora_state, key_c,
                              batch_c.lr, hp)
    has_wins = jnp.any(batch_c.train.valid)
    new_state = tr.keep_if(has_wins, trained, lora_state)
    return new_state, tr.client_stats(batch_c, metrics, has_wins)
