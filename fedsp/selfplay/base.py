"""The client-algorithm interface: `Policy`, `ClientBatch`, `Algorithm`, `get_algorithm`.

A client algorithm is two functions (DESIGN.md, "One round, as data flows"):

- ``collect`` (host side) runs ONE batched generation over every sampled client's
  prompts with the round's adapters (plus one per revision attempt), asks the simulated
  user for feedback, turns the outcomes into training traces and packs them into
  fixed-shape arrays stacked on a leading client axis [C, ...]. Text never leaves it:
  its outputs are a `ClientBatch` of arrays and a dict of float metrics.
- ``local_train`` (pure, per client) trains the adapter on one client's slice of the
  batch. The loop maps it over clients with ``fedsp.federated.mapping.map_clients``,
  base and round-start adapter frozen (``in_axes`` None), batch and keys stacked.

Per-client state that outlives a round, the reward baseline of advantage weighting
(an EMA of the client's past rewards), is owned by the loop: it passes the previous
baselines to ``collect(..., baselines=...)`` and stores ``stats["baseline"]`` from
``local_train`` (NaN means "no baseline yet").

Optional parts of the protocol, used by the pairwise self-play algorithms (SPIN, TPAW,
DPO) and read by the loop with ``getattr``:

- ``uses_context = True``: ``collect`` also takes ``context=`` a `RoundContext` (the
  sampled clients' global ids, the run's round-0 adapters, the player pool's adapters).
- ``uses_pool = True`` (with ``max_players`` and ``pool_on_error``): the loop keeps a
  `fedsp.checkpoint.PlayerPool` of the global adapters (round 0, then after every round)
  in the run state and hands its players to ``collect`` through the context.
- ``client_state() -> dict[str, np.ndarray]`` / ``load_client_state(arrays | None)``:
  host-side client data that outlives a round (SPIN/TPAW keep their clients' opponent
  data of earlier rounds: token ids). The loop stores it beside each run checkpoint,
  client side (never passed to the server step), and restores it on resume.

Shapes: C clients, S sequences per client, T tokens per sequence.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np
from flax import nnx

from fedsp.data.base import Example, Task
from fedsp.data.feedback import FeedbackProvider
from fedsp.model.tokenizer import Tokenizer

ALGORITHMS = ("spear", "feedback_sft", "sft", "grpo", "spin", "tpaw", "dpo")
# name -> module that registers it (imported on first use, so importing the interface
# does not import every algorithm).
_MODULES = {
    "spear": "fedsp.selfplay.spear",
    "feedback_sft": "fedsp.selfplay.spear",
    "sft": "fedsp.selfplay.sft",
    "grpo": "fedsp.selfplay.grpo",
    "spin": "fedsp.selfplay.spin",
    "tpaw": "fedsp.selfplay.tpaw",
    "dpo": "fedsp.selfplay.dpo",
}
_REGISTRY: dict[str, Any] = {}


class Policy(NamedTuple):
    """What rollouts need; built once per run: ``graphdef, _, base_state = split_lora(model)``."""

    graphdef: nnx.GraphDef
    base_state: nnx.State
    tokenizer: Tokenizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sequences:
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
      losses: [C] wrong first answers (before the ρ cap).
      players: pairwise algorithms only: the players' log-probs of every pair
        (`PlayerLogps`, leaves [C, J, S] / [C, J]); None otherwise.
    """

    train: Sequences
    lose: Sequences
    lr: jax.Array
    num_examples: jax.Array
    mean_advantage: jax.Array
    baseline: jax.Array
    wins: jax.Array
    losses: jax.Array
    players: PlayerLogps | None = None

    @property
    def num_clients(self) -> int:
        return int(self.lr.shape[0])


class RoundContext(NamedTuple):
    """What the loop tells algorithms with ``uses_context = True`` besides the examples.

    Attributes:
      clients: [C] the sampled clients' global ids (keys of per-client state).
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
        ``baseline``, ``wins``, ``losses`` and ``loss`` (mean over local steps).
        """
        ...


def register_algorithm(name: str):
    """Class decorator: ``get_algorithm(name, config)`` builds ``cls(name, config)``."""

    def wrap(cls):
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_algorithm(name: str, config: Any) -> Algorithm:
    """The client algorithm ``name`` configured from ``config`` (an ml_collections
    ConfigDict with ``algorithm``, ``rollout``, ``local`` and ``fl`` sections; missing
    fields take the SPEAR reference's defaults).

    Raises:
      ValueError: unknown ``name`` (the message lists the choices) or a bad field.
    """
    if name not in _MODULES:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    importlib.import_module(_MODULES[name])
    return _REGISTRY[name](name, config)


def config_value(config: Any, section: str, field: str, default: Any) -> Any:
    """``config.<section>.<field>``, or ``default`` where the section or field is absent."""
    if config is None:
        return default
    part = config.get(section) if isinstance(config, Mapping) or hasattr(config, "get") else None
    if part is None:
        part = getattr(config, section, None)
    if part is None:
        return default
    if hasattr(part, "get"):
        value = part.get(field, default)
    else:
        value = getattr(part, field, default)
    return default if value is None else value

