"""Logical-axis rules: one table maps the model's axis names onto a ("clients", "model") mesh.

Every parameter of ``fedsp.model.transformer`` carries logical axis names in its
``out_sharding`` metadata (e.g. ``("layers", "embed", "mlp")``). ``LOGICAL_AXIS_RULES``
maps each name to a mesh axis or None (replicated). The default shards the frozen base
weights FSDP-style over their ``embed`` (hidden) dimension on the "model" axis and
replicates everything else, LoRA adapters included, so a client's adapter update never
needs a collective. The "clients" axis is used by the federated client map
(``spmd_axis_name="clients"``) and by the rows of sampler and evaluation batches
(`shard_rows`), not by parameters: base weights are shared by all clients.

`mesh_shape` turns a config's ``fl.mesh`` ("auto" or a size per axis) into the mesh's
shape. A (1, 1) mesh maps every array onto one device and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedsp.distributed import put

MESH_AXES = ("clients", "model")
AUTO = "auto"

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


def mesh_problem(
    clients: int | str, model: int | str, clients_per_round: int, num_devices: int
) -> tuple[str, str] | None:
    """What is wrong with a ``(clients, model)`` mesh request, as (field, message), or None.

    The field is ``"clients"`` or ``"model"`` (``fl.mesh.<field>`` in a config). See
    `mesh_shape` for the rules.
    """
    for field, value in (("clients", clients), ("model", model)):
        if value != AUTO and (
            isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
        ):
            return field, f"must be {AUTO!r} or a positive integer, got {value!r}"
    if clients != AUTO and clients_per_round % int(clients):
        return "clients", (
            f"{clients} does not divide fl.clients_per_round = {clients_per_round}: every "
            "device of the clients axis must simulate the same number of clients"
        )
    if model != AUTO and int(model) > num_devices:
        return "model", f"{model} is more than the {num_devices} devices available"
    if clients != AUTO:
        per_group = num_devices // int(clients)
        if per_group < 1 or (model != AUTO and int(model) > per_group):
            needed = int(clients) * (1 if model == AUTO else int(model))
            return "clients", (
                f"a ({clients}, {model}) mesh needs {needed} devices, {num_devices} available"
            )
    return None


def mesh_shape(
    clients: int | str, model: int | str, clients_per_round: int, num_devices: int
) -> tuple[int, int]:
    """The (clients, model) mesh shape a config's ``fl.mesh`` asks for on ``num_devices``.

    An integer is taken as it is: the clients axis must divide ``clients_per_round``
    (each device simulates the same number of clients) and the mesh must fit the devices
    (it may use fewer). "auto" fills the devices: an auto clients axis is the largest
    divisor of ``clients_per_round`` that fits beside the model axis (an auto model axis
    counts as 1 there), then an auto model axis takes what is left, ``num_devices //
    clients``.

    Raises:
      ValueError: the request cannot be met; the message starts with ``fl.mesh.<field>``.
    """
    problem = mesh_problem(clients, model, clients_per_round, num_devices)
    if problem is not None:
        raise ValueError(f"fl.mesh.{problem[0]}: {problem[1]}")
    m = 1 if model == AUTO else int(model)
    if clients == AUTO:
        fits = num_devices // m
        c = max(
            d for d in range(1, clients_per_round + 1) if clients_per_round % d == 0 and d <= fits
        )
    else:
        c = int(clients)
    if model == AUTO:
        m = num_devices // c
    return c, m


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


def shard_state(
    state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
) -> nnx.State:
    """``state`` (e.g. the frozen base of ``split_lora``) with every variable placed on
    ``mesh`` by its logical axis names and ``rules``."""

    def place(var):
        names = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
        spec = logical_to_spec(names, var.get_value().shape, mesh, rules)
        return var.replace(put(var.get_value(), NamedSharding(mesh, spec)))

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array leaf of ``tree`` replicated on every device of ``mesh`` (a mesh may
    span hosts: every process passes the same values, `fedsp.distributed.put`); without
    a mesh (the pmap backend) ``tree`` as it is."""
    return tree if mesh is None else put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_model(
    model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES
) -> nnx.Module:
    """Places every variable of ``model`` on ``mesh`` by ``rules`` (in place; returns model).

    ``fedsp.model.transformer.load_hf_state_dict`` keeps these placements when it later
    overwrites the weights.
    """
    nnx.update(model, shard_state(nnx.state(model), mesh, rules))
    return model


def row_multiple() -> int:
    """Rows a batch should be padded to a multiple of under the context mesh: the size of
    its "clients" axis (1 without a mesh), so `shard_rows` can give every device rows."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "clients" not in mesh.axis_names:
        return 1
    return int(mesh.shape["clients"])


def padded_rows(n: int) -> int:
    """``n`` rounded up to a multiple of `row_multiple`: the row count a batch of ``n``
    rows is padded to so every device of the clients axis gets rows."""
    multiple = row_multiple()
    return -(-n // multiple) * multiple


def shard_rows(x: jax.Array) -> jax.Array:
    """``x`` split by rows over the context mesh's "clients" axis, inside a jit.

    Under ``jax.set_mesh(mesh)`` a batch of independent rows (sampler prompts, evaluation
    sequences) then runs C-way data parallel; with no mesh, no "clients" axis, or a row
    count the axis does not divide, ``x`` is returned as it is (XLA places it).
    """
    size = row_multiple()
    if size == 1 or x.ndim == 0 or x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec("clients"))


def device_bytes(tree: Any, device: jax.Device) -> int:
    """Bytes of ``tree``'s array leaves that ``device`` holds (its shards only)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            if shard.device == device:
                total += shard.data.nbytes
    return total
