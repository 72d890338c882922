"""Shape-only inputs of a round's programs, placed on a mesh: the model's parameters built
from its architecture alone (no weights read or drawn) and the batches the round feeds.

Every leaf is a ``jax.ShapeDtypeStruct`` carrying the ``NamedSharding`` the run gives the
real array (`fedsp.runner.init_run`): the frozen base sharded by the logical-axis rules
(`fedsp.model.sharding`), adapters and optimizer state replicated, per-client arrays
split over the "clients" axis.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedsp.model.config import ModelConfig
from fedsp.model.loading import read_hf_config
from fedsp.model.lora import apply_lora, split_lora
from fedsp.model.sampling import bucket_length
from fedsp.model.sharding import model_shardings
from fedsp.model.transformer import Transformer
from fedsp.run_setup import lora_config
from fedsp.selfplay.base import ClientBatch, PackedSequences, PlayerLogps
from fedsp.selfplay.grpo import Grpo
from fedsp.selfplay.pairs import PairwiseSelfPlay
from fedsp.selfplay.sft import Sft
from fedsp.selfplay.spear import Spear

__all__ = [
    "AbstractPolicy",
    "RoundRows",
    "abstract_batch",
    "abstract_policy",
    "model_config_from_dir",
    "replicated",
    "round_rows",
    "stacked",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RoundRows:
    """Rows per client of a round's programs, before the sampler and `packing.pack` round
    them up (see `round_rows`).

    Attributes:
      sampled: rollout rows (sampler prompts) per client; 0: the algorithm samples none.
      train: ``ClientBatch.train`` rows.
      lose: ``ClientBatch.lose`` rows; 0: the [1, 8] all-invalid placeholder.
      players: J, the player axis of ``ClientBatch.players`` (0: no players).
    """

    sampled: int
    train: int
    lose: int
    players: int


@dataclasses.dataclass(frozen=True)
class AbstractPolicy:
    """The split model as shapes: ``graphdef`` (static), ``lora`` and ``base`` states."""

    graphdef: nnx.GraphDef
    lora: nnx.State
    base: nnx.State
    model_config: ModelConfig


def model_config_from_dir(directory: str | pathlib.Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face model directory's ``config.json`` (no weights
    are read).

    Raises:
      FileNotFoundError: the directory has no config.json (the message names the file).
      ValueError: an unsupported architecture.
    """
    return ModelConfig.from_hf(read_hf_config(directory))


def replicated(tree: Any, mesh: Mesh) -> Any:
    """``tree``'s array leaves as ShapeDtypeStructs replicated on ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def stacked(tree: Any, num_clients: int, mesh: Mesh) -> Any:
    """``tree``'s leaves with a leading client axis [C, ...], split over "clients" (as the
    vmap client map leaves its outputs) when the axis divides C."""
    spec = PartitionSpec("clients") if num_clients % mesh.shape["clients"] == 0 else PartitionSpec()
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((num_clients, *x.shape), x.dtype, sharding=sharding), tree
    )


def abstract_policy(
    model_config: ModelConfig, config: ml_collections.ConfigDict, mesh: Mesh
) -> AbstractPolicy:
    """The run's split model (``config.model``: dtype, LoRA, remat) as placed shapes.

    Built as `fedsp.model.loading.from_pretrained` builds a model (``nnx.eval_shape``:
    no memory for the weights) with the adapters `fedsp.runner.init_run` attaches; the
    adapters' own values are drawn (they are small) and then dropped for their shapes.
    """
    param_dtype = _DTYPES[config.model.dtype]
    model = nnx.eval_shape(
        lambda r: Transformer(model_config, rngs=r, param_dtype=param_dtype), nnx.Rngs(0)
    )
    model.remat = config.model.remat
    apply_lora(model, lora_config(config, model_config.num_hidden_layers), rngs=nnx.Rngs(0))
    shardings = model_shardings(model, mesh)
    placed = jax.tree.map(
        lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding),
        nnx.state(model),
        shardings,
    )
    nnx.update(model, placed)
    graphdef, lora, base = split_lora(model)
    return AbstractPolicy(graphdef, replicated(lora, mesh), base, model_config)


def _sequences(num_clients: int, rows: int, length: int, mesh: Mesh) -> PackedSequences:
    one = jax.eval_shape(
        lambda: PackedSequences(
            tokens=jnp.zeros((rows, length), jnp.int32),
            attention_mask=jnp.zeros((rows, length), jnp.bool_),
            loss_mask=jnp.zeros((rows, length), jnp.float32),
            weight=jnp.zeros((rows,), jnp.float32),
            valid=jnp.zeros((rows,), jnp.bool_),
        )
    )
    return stacked(one, num_clients, mesh)


def round_rows(config: ml_collections.ConfigDict, algorithm: Any) -> RoundRows:
    """The most rows per client each program of ``algorithm``'s round sees, with
    P = ``rollout.prompts_per_client`` (`collect_batch` of each `fedsp.selfplay` module):
    SPEAR and feedback-SFT sample P first answers and pack at most one win per prompt (a
    correct first answer or a successful revision) and, for SPEAR, at most one lose;
    GRPO samples and packs ``group_size`` answers per prompt; SFT samples nothing and
    packs P gold completions; SPIN / TPAW / DPO sample P answers and pack this round's
    pairs plus those of their ``opponent_rounds`` − 1 earlier rounds, with J players
    (TPAW: ``n_max``; SPIN, DPO: one).

    Raises:
      ValueError: an algorithm the planner does not know the batch of (names the field).
    """
    prompts = int(config.rollout.prompts_per_client)
    if isinstance(algorithm, PairwiseSelfPlay):
        pairs = prompts * algorithm.hp.opponent_rounds
        players = algorithm.hp.n_max if algorithm.kind == "tpaw" else 1
        return RoundRows(prompts, pairs, pairs, players)
    if isinstance(algorithm, Spear):
        return RoundRows(prompts, prompts, prompts if algorithm.use_lose else 0, 0)
    if isinstance(algorithm, Grpo):
        rows = prompts * algorithm.hp.group_size
        return RoundRows(rows, rows, 0, 0)
    if isinstance(algorithm, Sft):
        return RoundRows(0, prompts, 0, 0)
    raise ValueError(
        f"algorithm.name: the planner knows the batches of spear, feedback_sft, grpo, sft, "
        f"spin, tpaw and dpo, not {config.algorithm.name!r}"
    )


def abstract_batch(
    config: ml_collections.ConfigDict, rows: RoundRows, num_clients: int, seq_len: int, mesh: Mesh
) -> ClientBatch:
    """The largest `ClientBatch` of ``rows`` for ``num_clients`` clients: every row
    present and every sequence ``seq_len`` tokens (at most ``local.max_len``, where
    `packing.pack` cuts)."""
    length = min(config.local.max_len, bucket_length(seq_len))
    train = _sequences(num_clients, bucket_length(rows.train), length, mesh)
    if rows.lose:
        lose = _sequences(num_clients, bucket_length(rows.lose), length, mesh)
    else:
        lose = _sequences(num_clients, 1, 8, mesh)
    scalar = stacked(jax.ShapeDtypeStruct((), jnp.float32), num_clients, mesh)
    players = None
    if rows.players:
        j, s = rows.players, bucket_length(rows.train)
        one = jax.eval_shape(
            lambda: PlayerLogps(
                pos=jnp.zeros((j, s), jnp.float32),
                neg=jnp.zeros((j, s), jnp.float32),
                mask=jnp.zeros((j,), jnp.bool_),
            )
        )
        players = stacked(one, num_clients, mesh)
    return ClientBatch(
        train=train,
        lose=lose,
        lr=scalar,
        num_examples=scalar,
        mean_advantage=scalar,
        baseline=scalar,
        wins=scalar,
        wrong=scalar,
        players=players,
    )
