"""Logical-axis rules: one table maps the model's axis names onto a ("clients", "model") mesh.

Every parameter of ``fedsp.model.transformer`` carries logical axis names in its
``out_sharding`` metadata (e.g. ``("layers", "embed", "mlp")``). ``LOGICAL_AXIS_RULES``
maps each name to a mesh axis or None (replicated). The default shards the frozen base
weights FSDP-style over their ``embed`` (hidden) dimension on the "model" axis and
replicates everything else, LoRA adapters included, so a client's adapter update never
needs a collective. The "clients" axis is used by the federated client map
(``spmd_axis_name="clients"``), not by parameters: base weights are shared by all clients.

A (1, 1) mesh, the CPU default, maps every array onto one device and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("clients", "model")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("vocab", None),
    ("embed", "model"),
    ("q_heads", None),
    ("kv_heads", None),
    ("mlp", None),
    ("norm", None),
    ("lora_in", None),
    ("lora_rank", None),
    ("lora_out", None),
)


def make_mesh(
    clients: int = 1, model: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ("clients", "model") mesh of clients × model devices (default: the first ones)."""
    devices = list(jax.devices() if devices is None else devices)
    if clients * model > len(devices):
        raise ValueError(
            f"mesh clients×model = {clients}×{model} needs {clients * model} devices, "
            f"{len(devices)} available"
        )
    grid = np.asarray(devices[: clients * model], dtype=object).reshape(clients, model)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """The PartitionSpec of an array with logical axis ``names`` under ``rules``.

    A dimension whose size the mesh axis does not divide is replicated instead (a 2-way
    "model" axis cannot split 9 heads), and a mesh axis is used at most once per array.

    Raises:
      ValueError: a name has no rule, or names and shape differ in length.
    """
    table = dict(rules)
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    spec: list[str | None] = []
    used: set[str] = set()
    for name, size in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        axis = table[name]
        if axis is None or axis in used or size % mesh.shape[axis]:
            spec.append(None)
        else:
            spec.append(axis)
            used.add(axis)
    return PartitionSpec(*spec)


def model_shardings(
    model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
) -> nnx.State:
    """An ``nnx.State`` whose variables hold the NamedSharding of each of ``model``'s."""
    state = nnx.state(model)

    def sharding(var):
        names = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
        spec = logical_to_spec(names, var.get_value().shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(
    model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
) -> nnx.Module:
    """Places every variable of ``model`` on ``mesh`` by ``rules`` (in place; returns model).

    ``fedsp.model.transformer.load_hf_state_dict`` keeps these placements when it later
    overwrites the weights.
    """
    shardings = model_shardings(model, mesh, rules)
    state = nnx.state(model)
    placed = jax.tree.map(
        lambda var, s: var.replace(jax.device_put(var.get_value(), s.get_value())),
        state,
        shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    nnx.update(model, placed)
    return model
