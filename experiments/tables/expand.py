"""A table's cells at a scale (``cpu``: the `cpu_config` family; ``tiny``: `tiny_scale`
on a `tiny_model`; ``full``: `experiments.configs.tables_full`) with ``--set``
overrides (`cells`), and each cell's run directory, one for cells that several tables
share (`cell_dirs`).
"""

from __future__ import annotations

import ast
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from experiments.configs import tables_full
from experiments.tables.base import DEFAULT_SEEDS, SCALES, Cell, Table
from experiments.tables.grids import TABLES

# --------------------------------------------------------------------------- scales


def tiny_scale(config: ml_collections.ConfigDict, model_path: str) -> None:
    """Shrinks a CPU-scale cell in place to a seconds-long run on a tiny random model,
    keeping its shape: a centralized cell keeps its single client."""
    config.model.path = model_path
    config.model.lora.rank, config.model.lora.alpha = 2, 4.0
    config.data.num_clients = min(config.data.num_clients, 2)
    config.data.limit = 32
    config.fl.clients_per_round = min(config.fl.clients_per_round, 2)
    config.fl.rounds = 2
    config.rollout.prompts_per_client = 2
    config.rollout.max_new_tokens = 4
    config.algorithm.max_revisions = min(config.algorithm.max_revisions, 1)
    config.algorithm.group_size = 2
    config.local.steps, config.local.batch_size, config.local.max_len = 1, 2, 128
    config.eval.examples, config.eval.max_new_tokens, config.eval.batch_size = 4, 4, 4
    config.eval.every = 1
    config.log.tensorboard = config.log.progress = False


def tiny_model(directory: pathlib.Path) -> pathlib.Path:
    """A 2-layer random SmolLM-shaped model with SmolLM2's tokenizer (as the tests'
    `tests.federated.fixtures.save_tiny_model`), saved once into ``directory``."""
    if (directory / "config.json").is_file():
        return directory
    from flax import nnx

    from fedsp.assets import default_model_path
    from fedsp.model import ModelConfig, Tokenizer, Transformer, save_pretrained

    hf = dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=1e5,
        tie_word_embeddings=True,
    )
    model = Transformer(ModelConfig.from_hf(hf), rngs=nnx.Rngs(0))
    return save_pretrained(model, directory, tokenizer=Tokenizer.from_gguf(default_model_path()))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted fields (``fl.rounds``); an unknown field raises naming it."""
    for key, value in overrides.items():
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(f"--set {key}: config has no field {'.'.join(parts[: i + 1])!r}")
            if i < len(parts) - 1:
                node = node[part]
        try:
            node[parts[-1]] = value
        except TypeError as err:
            raise ValueError(f"--set {key}={value!r}: {err}") from None


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["fl.rounds=3", "model.path=/x"]`` → ``{"fl.rounds": 3, "model.path": "/x"}``."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


# --------------------------------------------------------------------------- cells

# Tables share cells: a cell whose config equals (up to `log`/`checkpoint`) a cell of a
# table earlier in this order runs once, in that table's directory, and both tables read
# it. The settings table's federated SPEAR cells are the aggregation table's FedAvg cells,
# and the spear table's SPEAR and gold-SFT cells on arithmetic are those two tables' cells;
# the robustness table's cells (20 clients) are its own.
SHARING_ORDER = ("aggregation", "settings", "spear", "tpaw", "robustness")

# Fields added after some cells ran that change how a cell is computed, not what it
# computes (the samples are the same up to float rounding), with the value that a saved
# config without them is taken to have.
_EXECUTION_FIELDS = {("rollout", "reuse_cache"): True}


def comparable(config_json: dict[str, Any]) -> dict[str, Any]:
    """What makes two cells the same cell: the config without ``log``/``checkpoint`` and
    without `_EXECUTION_FIELDS` at their default. Cells equal under it share a run
    directory (`cell_dirs`), and a finished cell's saved config must equal its own under
    it (`experiments.tables.running.run_cell`)."""
    out = {k: v for k, v in config_json.items() if k not in ("log", "checkpoint")}
    for (section, field), default in _EXECUTION_FIELDS.items():
        part = out.get(section)
        if isinstance(part, dict) and part.get(field, default) == default:
            out[section] = {k: v for k, v in part.items() if k != field}
    return out


def _config_key(config: ml_collections.ConfigDict) -> str:
    return json.dumps(comparable(json.loads(config.to_json_best_effort())), sort_keys=True)


def cell_dirs(grid: Sequence[Cell], root: pathlib.Path, **grid_kwargs: Any) -> list[pathlib.Path]:
    """The run directory of each cell of ``grid``: ``root/<table>/<cell>`` of the first
    table in `SHARING_ORDER` with a cell of the same config (its own table's otherwise).

    ``root`` is ``<workdir>/<scale>``; ``grid_kwargs`` are the `cells` arguments the grid
    was built with (seeds, scale, overrides, tiny_model_path), so every table's cells are
    built the same way."""
    grid_kwargs.pop("only", None)
    owner: dict[str, pathlib.Path] = {}
    for name in SHARING_ORDER:
        for cell in cells(TABLES[name], **grid_kwargs):
            owner.setdefault(_config_key(cell.config), root / name / cell.name)
    return [owner.get(_config_key(c.config), root / c.table / c.name) for c in grid]


def cells(
    table: Table,
    *,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    scale: str = "cpu",
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] = (),
    tiny_model_path: str = "",
) -> list[Cell]:
    """Every (run, dataset, seed) cell of ``table``, with its config at ``scale``
    (``tiny`` needs ``tiny_model_path``), then ``overrides`` (dotted field → value).

    ``only`` keeps cells whose name (``run-dataset-sSEED``) contains one of its strings.
    """
    if scale not in SCALES:
        raise ValueError(f"--scale: got {scale!r}; choose one of {SCALES}")
    if scale == "tiny" and not tiny_model_path:
        raise ValueError("--scale tiny: needs a tiny model path (tiny_model_path)")
    out = []
    for run in table.runs:
        for dataset in table.datasets:
            for seed in seeds:
                if scale == "full":
                    config = tables_full.full_config(table.name, run.key, dataset, seed)
                else:
                    config = run.build(dataset, seed)
                    if scale == "tiny":
                        tiny_scale(config, tiny_model_path)
                if overrides:
                    apply_overrides(config, overrides)
                cell = Cell(table.name, run.key, dataset, int(seed), config)
                if not only or any(s in cell.name for s in only):
                    out.append(cell)
    return out
