"""Local training of one client: minibatch sampling, token log-probs, the AdamW loop,
and `LocalTraining`, which builds an algorithm's jitted ``local_train`` from its
minibatch loss.

Everything here is pure and jit/vmap-safe: ``local_train`` is mapped over clients by
``fedsp.federated.map_clients``.

Gradient accumulation (``local.micro_batch_size``) is in the model forward, not in the
loss: `LossContext.token_logps` runs the minibatch's rows in B / m passes
(`micro_batched_token_logps`) and the loss sees all B rows' log-probs, so its
normalisers, metrics and gradient are the full batch's for every algorithm.

    class MyAlgorithm(LocalTraining):
        @staticmethod
        def minibatch_loss(ctx, lora_state, batch_c, key):
            rows = gather_rows(batch_c.train, sample_rows(key, batch_c.train.valid,
                                                          ctx.hp.batch_size))
            logps = ctx.token_logps(lora_state, rows.tokens, rows.attention_mask)
            return sft_loss(logps, rows.loss_mask)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedsp.core.logprobs import token_logprobs
from fedsp.selfplay.base import ClientBatch, PackedSequences
from fedsp.selfplay.hparams import HParams

# Vocabulary projection is the largest activation ([B, T, V] float32); it is computed
# (and rematerialised in the backward pass) this many positions at a time.
_LOGITS_CHUNK = 128


def sample_rows(key: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """[k] indices of valid rows: without replacement when there are at least k valid
    rows, else with replacement (the reference's ``_sample``). With no valid row the
    indices point at invalid rows; callers mask by ``valid[idx]``."""
    (s,) = valid.shape
    k_perm, k_repl = jax.random.split(key)
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(k_perm, (s,)), 2.0))
    if s < k:
        order = jnp.concatenate([order, jnp.zeros((k - s,), order.dtype)])
    n = jnp.sum(valid)
    valid_first = jnp.argsort(~valid, stable=True)
    repl = valid_first[jax.random.randint(k_repl, (k,), 0, jnp.maximum(n, 1))]
    return jnp.where(n >= k, order[:k], repl)


def gather_rows(seqs: PackedSequences, idx: jax.Array) -> PackedSequences:
    """Rows ``idx`` of one client's sequences, with invalid rows' masks zeroed."""
    rows = jax.tree.map(lambda x: x[idx], seqs)
    keep = rows.valid.astype(jnp.float32)
    return dataclasses.replace(
        rows, loss_mask=rows.loss_mask * keep[:, None], weight=rows.weight * keep
    )


def sequence_token_logps(
    graphdef: nnx.GraphDef,
    lora_state: nnx.State,
    base_state: nnx.State,
    tokens: jax.Array,
    attention_mask: jax.Array,
) -> jax.Array:
    """[B, T] log π(tokens[:, t] | tokens[:, :t]); column 0 (no prefix) is 0.

    The vocabulary projection runs ``_LOGITS_CHUNK`` positions at a time under
    ``jax.checkpoint``, so neither pass holds the full [B, T, V] logits.
    """
    model = nnx.merge(graphdef, lora_state, base_state)
    hidden = model.hidden_states(tokens, attention_mask)[:, :-1]
    targets = tokens[:, 1:]

    @jax.checkpoint
    def chunk_logps(h, t):
        return token_logprobs(model.logits(h), t)

    t_len = targets.shape[1]
    parts = [
        chunk_logps(hidden[:, i : i + _LOGITS_CHUNK], targets[:, i : i + _LOGITS_CHUNK])
        for i in range(0, t_len, _LOGITS_CHUNK)
    ]
    return jnp.pad(jnp.concatenate(parts, axis=1), ((0, 0), (1, 0)))


def micro_batched_token_logps(
    graphdef: nnx.GraphDef,
    lora_state: nnx.State,
    base_state: nnx.State,
    tokens: jax.Array,
    attention_mask: jax.Array,
    micro_batches: int,
) -> jax.Array:
    """`sequence_token_logps` of R rows in ``micro_batches`` passes of R / micro_batches.

    Gradient accumulation that is exact for any loss of the log-probs. The passes run in
    a ``lax.scan`` whose body is under ``jax.checkpoint``: differentiated, the forward
    keeps only each pass's token ids, and the backward pass recomputes and
    differentiates one pass at a time, the scan summing the passes' adapter gradients,
    so activation memory is that of R / micro_batches rows. Rows are independent, so the
    [R, T] log-probs are those of one pass, and the loss that reads them sees the whole
    minibatch: token means, means over valid rows or pairs, GRPO's per-sequence then
    per-batch mean, unlikelihood's product of two means and TPAW's per-pair player
    softmax all keep their full-batch normalisers, rows are sampled (``sample_rows``) on
    the full batch before any split, and the step's loss, metrics and gradient equal
    those of one pass up to float summation order. The price is one more forward pass
    per step (2F + B instead of F + B; with ``model.remat`` "full" the layers' own
    recomputation comes on top). Summing per-micro-batch losses instead would save that
    pass, but is exact only for losses rewritten as per-row terms over full-batch
    normalisers passed in, a second protocol every loss would have to follow.

    When R is not a multiple of ``micro_batches`` (a user loss's odd row count) the last
    pass is filled with copies of the last row, whose log-probs are dropped: a zero
    cotangent, nothing added to the gradient. ``micro_batches`` 1 is
    `sequence_token_logps` itself.
    """
    if micro_batches <= 1:
        return sequence_token_logps(graphdef, lora_state, base_state, tokens, attention_mask)
    rows, length = tokens.shape
    size = -(-rows // micro_batches)
    fill = ((0, size * micro_batches - rows), (0, 0))
    tokens = jnp.pad(tokens, fill, mode="edge")
    attention_mask = jnp.pad(attention_mask, fill, mode="edge")

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_pass(lora, tok, att):
        return sequence_token_logps(graphdef, lora, base_state, tok, att)

    def body(_, xs):
        return None, one_pass(lora_state, *xs)

    def split(x):
        return x.reshape(micro_batches, size, length)

    _, logps = jax.lax.scan(body, None, (split(tokens), split(attention_mask)))
    return logps.reshape(micro_batches * size, length)[:rows]


LossFn = Callable[[nnx.State, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def fit(
    loss_fn: LossFn,
    lora_state: nnx.State,
    key: jax.Array,
    lr: jax.Array,
    hp: HParams,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """``hp.steps`` AdamW steps on ``loss_fn(lora, step_key)``; returns (adapters, mean metrics).

    AdamW as torch's (b = 0.9/0.999, eps 1e-8, decoupled weight decay) after global-norm
    clipping at ``hp.max_grad_norm`` (0: none); a step whose gradient is not finite
    is skipped, as the reference does (``optax.apply_if_finite``).
    """
    parts = [optax.clip_by_global_norm(hp.max_grad_norm)] if hp.max_grad_norm > 0 else []
    parts.append(optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=hp.weight_decay))
    tx = optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=hp.steps + 1)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(carry, step_key):
        lora, opt_state = carry
        (_, metrics), grads = grad_fn(lora, step_key)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return (optax.apply_updates(lora, updates), opt_state), metrics

    (lora_state, _), metrics = jax.lax.scan(
        step, (lora_state, tx.init(lora_state)), jax.random.split(key, hp.steps)
    )
    return lora_state, jax.tree.map(jnp.mean, metrics)


def keep_if(pred: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``pred`` else ``old`` leaf by leaf (exactly ``old``: a select)."""
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def client_stats(
    batch_c: ClientBatch, metrics: dict[str, jax.Array], trained: jax.Array
) -> dict[str, jax.Array]:
    """The stats every algorithm returns for one client: its loss metrics (means over
    local steps, 0 when it did not train) and the batch's per-client scalars;
    ``num_examples`` is 0 for a client that did not train."""
    metrics = jax.tree.map(lambda m: jnp.where(trained, m, 0.0).astype(jnp.float32), metrics)
    return {
        **metrics,
        "num_examples": jnp.where(trained, batch_c.num_examples, 0.0),
        "mean_advantage": batch_c.mean_advantage,
        "baseline": batch_c.baseline,
        "wins": batch_c.wins,
        "wrong": batch_c.wrong,
        "lr": batch_c.lr,
        "trained": trained.astype(jnp.float32),
    }


class LossContext(NamedTuple):
    """What a minibatch loss reads besides the adapters it differentiates.

    Attributes:
      graphdef: the split model's graph.
      hp: the algorithm's static hyper-parameters (``static_hparams()``).
      base_state: the frozen base weights.
      start_state: θ_r, the round-start adapters the client starts from (GRPO's old and
        reference policy).
      micro_batches: passes per `token_logps` call (`HParams.micro_batches`; 1: one).
    """

    graphdef: nnx.GraphDef
    hp: Any
    base_state: nnx.State
    start_state: nnx.State
    micro_batches: int = 1

    def token_logps(
        self, lora_state: nnx.State, tokens: jax.Array, attention_mask: jax.Array
    ) -> jax.Array:
        """`sequence_token_logps` under ``lora_state`` on this context's base, in
        ``micro_batches`` passes (`micro_batched_token_logps`)."""
        return micro_batched_token_logps(
            self.graphdef, lora_state, self.base_state, tokens, attention_mask, self.micro_batches
        )


# (ctx, lora_state, batch_c, key) -> (loss, metrics): one client's loss on one minibatch.
MinibatchLoss = Callable[
    [LossContext, nnx.State, ClientBatch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]
]


# Nothing to donate: θ_r (``lora_state``) is shared by every client and read again by the
# server step, and the AdamW state and adapter carry live inside this program's scan.
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def local_train(
    minibatch_loss: MinibatchLoss,
    graphdef: nnx.GraphDef,
    hp: Any,
    fit_hp: HParams,
    base_state: nnx.State,
    lora_state: nnx.State,
    batch_c: ClientBatch,
    key_c: jax.Array,
) -> tuple[nnx.State, dict[str, jax.Array]]:
    """One client's round of local training, jitted: `fit` on ``minibatch_loss`` from the
    round-start adapters ``lora_state``.

    A client whose batch has no valid ``train`` row does not train: its adapters come
    back unchanged (a select, so exactly) and it reports ``num_examples`` 0.

    Args:
      minibatch_loss: the algorithm's loss (static: one executable per loss function).
      graphdef: the split model's graph (static).
      hp: the loss's hyper-parameters (static, hashable).
      fit_hp: the training loop's settings: steps, clipping, weight decay, micro-batches
        (static).
      base_state, lora_state: the frozen base and θ_r.
      batch_c: one client's `ClientBatch` (no C axis).
      key_c: the client's training key.

    Returns:
      (adapters, `client_stats`).
    """
    ctx = LossContext(graphdef, hp, base_state, lora_state, fit_hp.micro_batches)
    trained, metrics = fit(
        lambda lora, k: minibatch_loss(ctx, lora, batch_c, k), lora_state, key_c, batch_c.lr, fit_hp
    )
    has_rows = jnp.any(batch_c.train.valid)
    return keep_if(has_rows, trained, lora_state), client_stats(batch_c, metrics, has_rows)


class LocalTraining:
    """Gives a client algorithm its ``local_train`` (`fedsp.selfplay.base.Algorithm`).

    A subclass sets ``hp`` (an `HParams`, or hyper-parameters that hold one) and defines
    ``minibatch_loss`` as a static method (`MinibatchLoss`); ``static_hparams`` and
    ``fit_hparams`` choose what the jitted step is keyed on and how it trains.
    """

    hp: Any

    if TYPE_CHECKING:
        # A `MinibatchLoss`, declared for type checkers only (the base class has no loss at
        # run time). As a ClassVar[Callable] it would be bound like a method, losing ``ctx``.
        @staticmethod
        def minibatch_loss(
            ctx: LossContext, lora_state: nnx.State, batch_c: ClientBatch, key: jax.Array, /
        ) -> tuple[jax.Array, dict[str, jax.Array]]: ...

    def static_hparams(self) -> Any:
        """The loss's hyper-parameters with host-only fields fixed (`HParams.static`)."""
        return self.hp.static()

    def fit_hparams(self, static_hp: Any) -> HParams:
        """The training loop's `HParams` within ``static_hparams()``."""
        return static_hp

    def local_train(
        self,
        graphdef: nnx.GraphDef,
        base_state: nnx.State,
        lora_state: nnx.State,
        batch_c: ClientBatch,
        key_c: jax.Array,
    ) -> tuple[nnx.State, dict[str, jax.Array]]:
        """See `fedsp.selfplay.base.Algorithm.local_train`."""
        hp = self.static_hparams()
        return local_train(
            type(self).minibatch_loss,
            graphdef,
            hp,
            self.fit_hparams(hp),
            base_state,
            lora_state,
            batch_c,
            key_c,
        )
