"""The client-algorithm interface: `Policy`, `ClientBatch`, `Algorithm`.

A client algorithm is two functions (docs/design.md, "One round, as data flows"):

- ``collect`` (host side) runs ONE batched generation over every sampled client's
  prompts with the round's adapters (plus one per revision attempt), asks the simulated
  user for feedback, turns the outcomes into training traces and packs them into
  fixed-shape arrays stacked on a leading client axis [C, ...]. Text never leaves it:
  its outputs are a `ClientBatch` of arrays and a dict of float metrics.
- ``local_train`` (pure, per client) trains the adapter on one client's slice of the
  batch. The round maps it over clients with ``fedsp.federated.map_clients``, base and
  round-start adapter frozen (``in_axes`` None), batch and keys stacked.
  `fedsp.selfplay.train.LocalTraining` builds it from a minibatch loss.

`Collector` implements ``collect`` once for the built-in algorithms (and any user one):
it checks the arguments and passes them as one `RoundInputs` to ``collect_batch``.

Per-client state that outlives a round, the reward baseline of advantage weighting
(an EMA of the client's past rewards), is owned by the round loop: it passes the
previous baselines to ``collect(..., baselines=...)`` and stores ``stats["baseline"]``
from ``local_train`` (NaN means "no baseline yet").

Optional parts of the protocol, used by the pairwise self-play algorithms (SPIN, TPAW,
DPO) and read by the round loop with ``getattr``:

- ``uses_context = True``: ``collect`` also takes ``context=`` a `RoundContext` (the
  sampled clients' global ids, the run's round-0 adapters, the player pool's adapters).
- ``uses_pool = True`` (with ``max_players`` and ``pool_on_error``; `PoolAlgorithm`): the
  loop keeps a `fedsp.checkpoint.PlayerPool` of the global adapters (round 0, then after
  every round) in the run state and hands its players to ``collect`` through the context.
- ``client_state() -> dict[str, np.ndarray]`` / ``load_client_state(arrays | None)``:
  host-side client data that outlives a round (SPIN/TPAW keep their clients' opponent
  data of earlier rounds: token ids). The loop stores it beside each run checkpoint,
  client side (never passed to the server step), and restores it on resume.

Algorithms are registered by name in `fedsp.selfplay.registry`.

Shapes: C clients, S sequences per client, T tokens per sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.data.base import Example, Task
from fedsp.data.feedback import FeedbackProvider
from fedsp.model.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fedsp.checkpoint.pool import OnError


class Policy(NamedTuple):
    """What rollouts need; built once per run: ``graphdef, _, base_state = split_lora(model)``."""

    graphdef: nnx.GraphDef
    base_state: nnx.State
    tokenizer: Tokenizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Right-padded prompt + completion sequences, [..., S, T] (a leading C when stacked).

    Attributes:
      tokens: [..., S, T] int32 token ids (pad id after the sequence).
      attention_mask: [..., S, T] bool, True on real tokens.
      loss_mask: [..., S, T] float32, 1 on the tokens the loss reads: the completion
        tokens (likelihood), or for unlikelihood only the tail tokens of a wrong
        completion without end-of-turn and protected format tokens. Token t is
        predicted from tokens < t, so position 0 is never in it.
      weight: [..., S] float32 per-sequence weight: SPEAR confidence for lose rows, AWR
        weight for win rows (1 when AWR is off), group advantage for GRPO samples.
      valid: [..., S] bool, False on padding rows.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    loss_mask: jax.Array
    weight: jax.Array
    valid: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PlayerLogps:
    """Sequence log-probs of every pair under J fixed players, computed once per round.

    Pairwise algorithms train on (y⁺, y⁻) pairs: row s of ``ClientBatch.train`` (y⁺) goes
    with row s of ``ClientBatch.lose`` (y⁻). A player is a frozen policy the loss
    compares against: SPIN's opponent (the round-start policy), TPAW's team of pool
    checkpoints, DPO's reference. Their log-probs carry no gradient, so ``collect``
    computes them in one forward per player per response and every local step reuses
    them.

    Attributes:
      pos: [..., J, S] float32 Σ_t log π_j(y⁺_t | x, y⁺_<t) over the completion tokens.
      neg: [..., J, S] the same for y⁻.
      mask: [..., J] bool, True for real players (a pool that is not full yet pads J).
    """

    pos: jax.Array
    neg: jax.Array
    mask: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClientBatch:
    """Everything ``local_train`` needs, stacked over clients [C, ...]; arrays only.

    Attributes:
      train: sequences trained by likelihood-based losses: SPEAR / feedback-SFT win
        traces, SFT gold completions, GRPO samples (``weight`` = group advantage).
      lose: SPEAR's lose traces for the unlikelihood term; a [C, 1, 8] all-invalid
        placeholder for algorithms without one.
      lr: [C] the round's learning rate (the reference's per-round warmup + cosine).
      num_examples: [C] the client's aggregation weight under FedAvg: SPEAR's win count
        (0 when there is no win, hence no update), else the number of trained sequences.
      mean_advantage: [C] mean over the round's rollouts of reward − previous baseline.
      baseline: [C] the client's reward baseline after this round (NaN: none yet).
      wins: [C] win traces (correct first answers + successful revisions).
      wrong: [C] wrong first answers (SPEAR: before the ρ cap; pairwise: samples the task
        judges wrong).
      players: pairwise algorithms only: the players' log-probs of every pair
        (`PlayerLogps`, leaves [C, J, S] / [C, J]); None otherwise.
    """

    train: PackedSequences
    lose: PackedSequences
    lr: jax.Array
    num_examples: jax.Array
    mean_advantage: jax.Array
    baseline: jax.Array
    wins: jax.Array
    wrong: jax.Array
    players: PlayerLogps | None = None

    @property
    def num_clients(self) -> int:
        return int(self.lr.shape[0])


class RoundContext(NamedTuple):
    """What the loop tells algorithms with ``uses_context = True`` besides the examples.

    Attributes:
      clients: [C] the round's clients' global ids (the sampled ones that deliver in
        time, `fedsp.federated.faults`; keys of per-client state).
      reference: the run's round-0 adapters (DPO's frozen reference), or None.
      players: the player pool's adapters stacked on a leading J axis (``uses_pool``),
        oldest first, padded with zeros; None without a pool.
      player_mask: [J] bool, True for the real players; None without a pool.
      player_rounds: the rounds whose global adapters the real players are.
    """

    clients: np.ndarray
    reference: nnx.State | None = None
    players: Any = None
    player_mask: jax.Array | None = None
    player_rounds: tuple[int, ...] = ()


class Algorithm(Protocol):
    """A client algorithm; see the module docstring."""

    name: str

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
        """Host side: batched rollouts, feedback, traces, packing (see module docstring).

        Args:
          policy: the frozen base and the tokenizer.
          lora_state: the round's (server) adapters.
          client_examples: per sampled client, the round's examples.
          task: prompts and correctness.
          feedback: the simulated user.
          key: the round's PRNG key; with ``round`` and the attempt it fixes every sample.
          round: the training round, 1-based (the LR schedule's step).
          baselines: [C] previous reward baselines (NaN or None: none yet).

        An algorithm may also take ``slots``: [C] each client's position among the
        round's clients (the sampled ones that deliver in time), the client index of its
        rollout keys (None: 0..C-1).
        A client that runs on its own (a `fedsp.flower` node) passes its position, so
        it samples what the in-process simulator samples for it; `Collector` takes it.
        """
        ...

    def local_train(
        self,
        graphdef: nnx.GraphDef,
        base_state: nnx.State,
        lora_state: nnx.State,
        batch_c: ClientBatch,
        key_c: jax.Array,
    ) -> tuple[nnx.State, dict[str, jax.Array]]:
        """Pure, one client (``batch_c`` without the C axis): (new adapters, stats).

        Stats are float32 scalars and include ``num_examples``, ``mean_advantage``,
        ``baseline``, ``wins``, ``wrong`` and ``loss`` (mean over local steps): what
        the client uploads besides its adapters.
        """
        ...


class PoolAlgorithm(Algorithm, Protocol):
    """An `Algorithm` with ``uses_pool = True`` (see the module docstring)."""

    uses_pool: bool
    max_players: int
    pool_on_error: OnError


@dataclasses.dataclass(frozen=True)
class RoundInputs:
    """One round's `Algorithm.collect` arguments, validated, as `Collector` passes them.

    The fields are ``collect``'s arguments, except ``baselines``: [C] float32, NaN for a
    client with no baseline yet (never None); ``slots`` (None: 0..C-1) gives each
    client's index in the rollout keys (`slot`).
    """

    policy: Policy
    lora_state: nnx.State
    client_examples: Sequence[Sequence[Example]]
    task: Task
    feedback: FeedbackProvider
    key: jax.Array
    round: int
    baselines: np.ndarray
    context: RoundContext | None = None
    slots: np.ndarray | None = None

    @property
    def num_clients(self) -> int:
        """C, the number of sampled clients."""
        return len(self.client_examples)

    def slot(self, c: int) -> int:
        """Client ``c``'s index in the rollout keys (`fedsp.selfplay.rollout.rollout_keys`):
        its position among the round's clients (the sampled ones that deliver in time)."""
        return c if self.slots is None else int(self.slots[c])


class Collector:
    """``Algorithm.collect`` written once, for algorithms to inherit.

    It checks that clients were sampled and that the baselines have one entry per client,
    bundles the arguments into `RoundInputs` and calls ``collect_batch``, the part an
    algorithm writes.
    """

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
        context: RoundContext | None = None,
        slots: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[ClientBatch, dict[str, float]]:
        """See `Algorithm.collect`; ``context`` reaches algorithms with ``uses_context``."""
        num_clients = check_clients(client_examples)
        if slots is not None:
            slots = np.asarray(slots, np.int64)
            if slots.shape != (num_clients,):
                raise ValueError(
                    f"slots must hold one position per client ({num_clients}), "
                    f"got shape {slots.shape}"
                )
        inputs = RoundInputs(
            policy,
            lora_state,
            client_examples,
            task,
            feedback,
            key,
            round,
            prev_baselines(baselines, num_clients),
            context,
            slots,
        )
        return self.collect_batch(inputs)

    def collect_batch(self, inputs: RoundInputs) -> tuple[ClientBatch, dict[str, float]]:
        """Host side of one round for ``inputs.num_clients`` clients (`Algorithm.collect`)."""
        raise NotImplementedError


def client_batch(
    train: PackedSequences,
    *,
    lr: float,
    num_examples: Any,
    baseline: Any,
    wins: Any,
    wrong: Any = None,
    mean_advantage: Any = None,
    lose: PackedSequences | None = None,
    players: PlayerLogps | None = None,
) -> ClientBatch:
    """A `ClientBatch` of C clients (C = ``train``'s leading axis) from host values.

    ``lr`` is the round's learning rate, the same for every client; ``num_examples``,
    ``baseline``, ``wins``, ``wrong`` and ``mean_advantage`` are [C] sequences of numbers
    (``wrong`` and ``mean_advantage`` default to zeros: no wrong answers counted, no reward
    observed); ``lose`` defaults to the all-invalid placeholder of algorithms without
    lose traces.
    """
    c = int(train.tokens.shape[0])

    def per_client(name: str, values: Any) -> jax.Array:
        out = jnp.zeros((c,), jnp.float32) if values is None else jnp.asarray(values, jnp.float32)
        if out.shape != (c,):
            raise ValueError(f"{name} must hold one value per client ({c}), got shape {out.shape}")
        return out

    return ClientBatch(
        train=train,
        lose=empty_sequences(c) if lose is None else lose,
        lr=jnp.full((c,), lr, jnp.float32),
        num_examples=per_client("num_examples", num_examples),
        mean_advantage=per_client("mean_advantage", mean_advantage),
        baseline=per_client("baseline", baseline),
        wins=per_client("wins", wins),
        wrong=per_client("wrong", wrong),
        players=players,
    )


def empty_sequences(num_clients: int) -> PackedSequences:
    """An all-invalid [C, 1, 8] placeholder (algorithms without lose traces)."""
    return PackedSequences(
        tokens=jnp.zeros((num_clients, 1, 8), jnp.int32),
        attention_mask=jnp.zeros((num_clients, 1, 8), bool),
        loss_mask=jnp.zeros((num_clients, 1, 8), jnp.float32),
        weight=jnp.zeros((num_clients, 1), jnp.float32),
        valid=jnp.zeros((num_clients, 1), bool),
    )


def check_clients(client_examples: Sequence[Sequence[Example]]) -> int:
    """C, the number of sampled clients of a ``collect`` call.

    Raises:
      ValueError: no client was sampled.
    """
    if len(client_examples) == 0:
        raise ValueError("client_examples is empty: no client was sampled")
    return len(client_examples)


def prev_baselines(baselines: Sequence[float] | np.ndarray | None, num_clients: int) -> np.ndarray:
    """[C] previous baselines as float32 (NaN: none yet)."""
    if baselines is None:
        return np.full(num_clients, np.nan, np.float32)
    out = np.asarray(baselines, np.float32)
    if out.shape != (num_clients,):
        raise ValueError(
            f"baselines must have shape ({num_clients},), one per client, got {out.shape}"
        )
    return out
