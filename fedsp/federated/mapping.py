"""Run a per-client pure function over a leading stacked client axis [C, ...].

``map_clients(fn, backend, in_axes=...)`` is the federated analogue of ``jax.vmap``:
arguments marked 0 in ``in_axes`` carry the client axis (adapters, optimizer state,
batches), arguments marked None are frozen and shared (base weights, the round's
starting parameters) and are never stacked or copied per client. Every backend returns
the same numbers; they differ in where clients run:

- ``"vmap"``: drjax (``drjax.program`` + ``drjax.map_fn``), i.e. ``jax.vmap`` with
  ``spmd_axis_name="clients"`` plus sharding constraints over a ``"clients"`` mesh axis:
  each device simulates C/D clients, and the outputs stay sharded over that axis. A
  mesh with a second ``"model"`` axis shards the frozen weights within a client group.
  With ``clients_at_once=k`` a device runs its C/D clients k at a time instead, one
  group after another inside the same program (``jax.shard_map`` over the clients axis,
  ``jax.lax.map`` within a device): the memory of k clients' temporaries, not C/D.
- ``"pmap"``: ``jax.pmap``, one client per device; C > D clients run as D groups of C/D
  clients, vmapped inside each device.
- ``"loop"``: a plain Python loop over clients, outputs stacked; for debugging
  (``print``/breakpoints inside ``fn`` see concrete per-client values) and notebooks.

Static configuration (Python numbers, dataclasses) is bound with ``functools.partial``
or a closure; positional arguments must be pytrees of arrays.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import drjax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from fedsp.executables import Program

BACKENDS = ("vmap", "pmap", "loop")
CLIENTS_AXIS = "clients"

InAxes = int | None | Sequence[int | None]
Axes = tuple[int | None, ...]


def client_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh with one ``"clients"`` axis over the first ``num_devices`` devices.

    Args:
      num_devices: devices on the axis; None uses every device (``jax.device_count()``).

    Returns:
      ``jax.make_mesh((D,), ("clients",))`` with an Auto axis type, so sharding
      propagation places everything not pinned to the client axis.
    """
    size = jax.device_count() if num_devices is None else num_devices
    return jax.make_mesh((size,), (CLIENTS_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _normalize_in_axes(in_axes: InAxes) -> int | Axes | None:
    entries = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,)
    for axis in entries:
        if axis is not None and (isinstance(axis, bool) or axis != 0):
            raise ValueError(
                f"in_axes entries must be 0 (stacked over clients) or None (frozen, "
                f"broadcast), got in_axes={in_axes!r}"
            )
    if isinstance(in_axes, (tuple, list)):
        return tuple(in_axes)
    # Any other sequence (a str, a range) failed the entry check above.
    assert not isinstance(in_axes, Sequence)
    return in_axes


def _axes_for(in_axes: int | Axes | None, num_args: int) -> Axes:
    if not isinstance(in_axes, tuple):
        axes = (in_axes,) * num_args
    elif len(in_axes) != num_args:
        raise ValueError(
            f"in_axes has {len(in_axes)} entries {in_axes!r} but the mapped function was "
            f"called with {num_args} positional arguments"
        )
    else:
        axes = in_axes
    if 0 not in axes:
        raise ValueError(
            f"in_axes must mark at least one argument with 0 (the client axis), got {axes!r}"
        )
    return axes


def _num_clients(args: tuple[Any, ...], axes: Axes) -> int:
    """The client count C shared by the leading axis of every stacked argument leaf."""
    sizes: dict[str, int] = {}
    for index, (arg, axis) in enumerate(zip(args, axes)):
        if axis is None:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            name = f"argument {index}{jax.tree_util.keystr(path)}"
            shape = jnp.shape(leaf)
            if not shape:
                raise ValueError(
                    f"{name} is stacked (in_axes 0) and needs a leading client axis "
                    "[C, ...], got a scalar"
                )
            sizes[name] = shape[0]
    if not sizes:
        raise ValueError(
            "the stacked arguments (in_axes 0) hold no arrays: the client count C is undefined"
        )
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(f"stacked arguments must share one leading client axis C, got {listing}")
    return next(iter(sizes.values()))


def _split(args: tuple[Any, ...], axes: Axes) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    stacked = tuple(a for a, axis in zip(args, axes) if axis == 0)
    frozen = tuple(a for a, axis in zip(args, axes) if axis is None)
    return frozen, stacked


def _join(axes: Axes, frozen: Sequence[Any], stacked: Sequence[Any]) -> list[Any]:
    frozen_it, stacked_it = iter(frozen), iter(stacked)
    return [next(stacked_it) if axis == 0 else next(frozen_it) for axis in axes]


def _under_transformation(args: tuple[Any, ...]) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))


def _in_groups(
    fn: Callable[..., Any], mesh: jax.sharding.Mesh, axes: Axes, clients_at_once: int
) -> Callable[..., Any]:
    """The clients of each device ``clients_at_once`` at a time, in one program (to jit)."""

    def program(*args: Any) -> Any:
        frozen, stacked = _split(args, axes)

        def local(frozen: tuple[Any, ...], stacked: tuple[Any, ...]) -> Any:
            def per_client(slices: tuple[Any, ...]) -> Any:
                return fn(*_join(axes, frozen, slices))

            # batch_size None is a plain scan, one client at a time.
            group = clients_at_once if clients_at_once > 1 else None
            return jax.lax.map(per_client, stacked, batch_size=group)

        clients = PartitionSpec(CLIENTS_AXIS)
        return jax.shard_map(
            local,
            mesh=mesh,
            # Frozen arguments are replicated over the clients axis (a "model" axis
            # still shards them: only the clients axis is manual here).
            in_specs=(PartitionSpec(), clients),
            out_specs=clients,
            axis_names={CLIENTS_AXIS},
            check_vma=False,
        )(frozen, stacked)

    return program


def _vmap_program(
    fn: Callable[..., Any],
    mesh: jax.sharding.Mesh,
    num_clients: int,
    axes: Axes,
    clients_at_once: int,
) -> Callable[..., Any]:
    if clients_at_once:
        return _in_groups(fn, mesh, axes, clients_at_once)

    @drjax.program(placements={CLIENTS_AXIS: num_clients})
    def program(*args: Any) -> Any:
        frozen, stacked = _split(args, axes)
        # Frozen arguments are closed over rather than `drjax.broadcast`: vmap then
        # sees them as unbatched, so x @ W_base stays one matmul with the clients
        # folded into its rows. A broadcast would materialise C/D copies of the base
        # weights per device and turn every such matmul into a batched one, with
        # temporaries the size of the weights.
        per_client = lambda *slices: fn(*_join(axes, frozen, slices))  # noqa: E731
        return drjax.map_fn(per_client, stacked, mesh=mesh)

    return program


def _vmap_backend(
    fn: Callable[..., Any],
    mesh: jax.sharding.Mesh,
    in_axes: int | Axes | None,
    clients_at_once: int = 0,
    static_key: Hashable = None,
) -> Callable[..., Any]:
    @functools.cache
    def program_for(num_clients: int, axes: Axes) -> Callable[..., Any]:
        program = _vmap_program(fn, mesh, num_clients, axes, clients_at_once)
        if static_key is None:
            return jax.jit(program)
        # The mesh's devices and axes are in the arguments' shardings and the key's
        # environment; the rest of the program's shape is fixed here.
        return Program(
            program,
            "fedsp.federated.map_clients",
            (static_key, num_clients, axes, clients_at_once, mesh.axis_names, mesh.shape_tuple),
        )

    def mapped(*args: Any) -> Any:
        axes = _axes_for(in_axes, len(args))
        program = program_for(_num_clients(args, axes), axes)
        if _under_transformation(args):
            # jax.set_mesh cannot be entered under jit: the caller sets the mesh context
            # around its own jit; drjax gets the mesh explicitly either way.
            return program(*args)
        with jax.set_mesh(mesh):
            return program(*args)

    return mapped


def _pmap_backend(fn: Callable[..., Any], in_axes: int | Axes | None) -> Callable[..., Any]:
    @functools.cache
    def pmapped_for(axes: Axes) -> Callable[..., Any]:
        # Clients form [devices, clients per device]: pmap over the first axis, vmap over
        # the second, with the frozen arguments broadcast by both (in_axes None).
        return jax.pmap(jax.vmap(fn, in_axes=axes), in_axes=axes)

    def mapped(*args: Any) -> Any:
        axes = _axes_for(in_axes, len(args))
        num_clients = _num_clients(args, axes)
        num_devices = jax.local_device_count()
        if num_clients <= num_devices:
            groups = num_clients
        elif num_clients % num_devices == 0:
            groups = num_devices
        else:
            raise ValueError(
                f"the pmap backend needs the client count C = {num_clients} to be at most, "
                f"or a multiple of, the local device count {num_devices}"
            )
        per_group = num_clients // groups
        grouped = [
            jax.tree.map(lambda x: jnp.reshape(x, (groups, per_group, *jnp.shape(x)[1:])), a)
            if axis == 0
            else a
            for a, axis in zip(args, axes)
        ]
        out = pmapped_for(axes)(*grouped)
        return jax.tree.map(lambda x: jnp.reshape(x, (num_clients, *x.shape[2:])), out)

    return mapped


def _loop_backend(fn: Callable[..., Any], in_axes: int | Axes | None) -> Callable[..., Any]:
    def mapped(*args: Any) -> Any:
        axes = _axes_for(in_axes, len(args))
        num_clients = _num_clients(args, axes)
        outputs = []
        for client in range(num_clients):
            sliced = [
                jax.tree.map(operator.itemgetter(client), a) if axis == 0 else a
                for a, axis in zip(args, axes)
            ]
            outputs.append(fn(*sliced))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)

    return mapped


def map_clients(
    fn: Callable[..., Any],
    backend: str = "vmap",
    *,
    mesh: jax.sharding.Mesh | None = None,
    in_axes: InAxes = 0,
    clients_at_once: int = 0,
    static_key: Hashable = None,
) -> Callable[..., Any]:
    """Maps ``fn`` over the leading client axis of its stacked arguments.

    ``map_clients(fn, backend, in_axes=(None, 0))(frozen, stacked)`` returns the stack
    over clients k of ``fn(frozen, stacked[k])``, like ``jax.vmap(fn, in_axes)`` but
    placed across devices. For example, local training from the shared round start:

        train = map_clients(local_train, "vmap", in_axes=(None, None, 0))
        client_adapters, stats = train(base_weights, server_adapters, batches)

    Args:
      fn: a pure function of one client's arguments; it returns a pytree of arrays.
      backend: ``"vmap"`` (drjax over a ``"clients"`` mesh axis), ``"pmap"`` (one client
        per device) or ``"loop"`` (Python loop). See the module docstring.
      mesh: vmap backend only: a mesh with a ``"clients"`` axis, possibly with other
        axes such as ``"model"`` (the frozen arguments may be sharded over those by
        the caller); default `client_mesh()`. The pmap backend uses the local devices,
        the loop backend the default device.
      in_axes: one entry per positional argument, 0 (stacked: every leaf has a leading
        client axis C) or None (frozen: passed whole to every client); a single 0 or
        None applies to all arguments. At least one argument must be stacked.
      clients_at_once: vmap backend: 0 (default) runs all of a device's clients
        together (vmapped); k ≥ 1 runs them k at a time, sequentially within the same
        program, so the temporaries are those of k clients (see the module docstring).
        The loop backend ignores it (one client at a time); pmap takes 0 only.
      static_key: vmap backend: with one, the compiled program is kept across processes
        (`fedsp.executables.Program`) and a later process with the same key, arguments
        and devices loads it without tracing ``fn``. It must fix everything ``fn``
        reads besides its arguments (a run passes its config); None (default) compiles
        in each process.

    Returns:
      A function of the same positional arguments returning ``fn``'s output with every
      leaf stacked over clients, [C, ...]. With the vmap backend the outputs are
      sharded over the ``"clients"`` mesh axis, each device holding C/D clients: give
      it a C that the axis size D divides (a run's ``fl.mesh`` is checked for it). The
      vmap and pmap backends compile ``fn`` once per client count and argument shapes;
      all backends can be called inside ``jax.jit`` (under jit, set the mesh context
      with ``jax.set_mesh`` around the outer call if ``fn`` needs it).

    Raises:
      ValueError: for an unknown ``backend`` (listing the choices), a mesh without a
        ``"clients"`` axis, bad ``in_axes`` or ``clients_at_once`` (negative, or set with
        the pmap backend); when called, if the stacked arguments
        disagree on C, or for pmap if C is above and not a multiple of the device count.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    in_axes = _normalize_in_axes(in_axes)
    if isinstance(clients_at_once, bool) or not isinstance(clients_at_once, int):
        raise ValueError(f"clients_at_once must be an integer, got {clients_at_once!r}")
    if clients_at_once < 0 or (clients_at_once and backend == "pmap"):
        raise ValueError(
            f"clients_at_once must be 0, or >= 1 with the vmap backend (the loop backend "
            f"runs one client at a time anyway); got {clients_at_once} with backend "
            f"{backend!r}"
        )
    if backend == "vmap":
        mesh = client_mesh() if mesh is None else mesh
        if CLIENTS_AXIS not in mesh.axis_names:
            raise ValueError(
                f"mesh must have a {CLIENTS_AXIS!r} axis for the vmap backend, got axes "
                f"{mesh.axis_names}"
            )
        return _vmap_backend(fn, mesh, in_axes, clients_at_once, static_key)
    if backend == "pmap":
        return _pmap_backend(fn, in_axes)
    return _loop_backend(fn, in_axes)
