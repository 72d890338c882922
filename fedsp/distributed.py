"""Multi-host runs: JAX's multi-controller runtime, started from the config's ``distributed``.

On a TPU pod slice or a GPU cluster every host runs the same ``python -m experiments.run``;
`initialize` joins them into one JAX runtime (``jax.distributed.initialize``), after which
``jax.devices()`` lists every host's devices and the run's ("clients", "model") mesh spans
them. The round loop stays one program: every process runs the same host-side steps
(client sampling, prompt choice, feedback, packing) on the same inputs, which are all
functions of (seed, round, client), so they agree without being sent around.

A failing process ends at once (`stop_all_on_error`, around `fedsp.run`), and the others
then stop within ``heartbeat_timeout_s``: a multi-host run never hangs on a dead peer.

What differs from one process: array values that live on other hosts' devices are
fetched with `to_host` (a collective every process calls); host values become global
arrays with `put`; files are written by the main process (`is_main_process`) only,
except Orbax checkpoints, which every process writes together, and file changes other
processes must see are followed by `sync`.

Config (``config.distributed``): ``initialize`` = "auto" (join when a coordinator address
is given, in the config or as ``JAX_COORDINATOR_ADDRESS``), True (always join; fields left
unset are detected by JAX on Cloud TPU, SLURM, Open MPI and similar clusters) or False;
``coordinator_address`` ("host:port" of process 0), ``coordinator_bind_address`` (""
= JAX's default, every interface), ``num_processes`` / ``process_id`` (0 / -1 = detect),
``initialization_timeout_s``, ``heartbeat_timeout_s`` (a process that stops answering is
declared dead after this long, and the others stop with an error instead of waiting).
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

__all__ = [
    "AUTO",
    "check_agreement",
    "distributed_problems",
    "initialize",
    "is_main_process",
    "put",
    "stop_all_on_error",
    "sync",
    "to_host",
]

AUTO = "auto"
_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
# Words in the errors a collective raises when a peer process has gone away.
_PEER_GONE = ("connection closed", "connection reset", "broken pipe", "another task", "heartbeat")


def distributed_problems(section: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """What is wrong with a ``distributed`` config section, as (field, message) pairs."""
    problems = []
    if section.initialize not in (AUTO, True, False):
        problems.append(("initialize", f"got {section.initialize!r}; choose 'auto', True or False"))
    for field in ("coordinator_address", "coordinator_bind_address"):
        value = section[field]
        if not isinstance(value, str) or (value and not _is_host_port(value)):
            problems.append((field, f"must be 'host:port' or '', got {value!r}"))
    for field, low in (("num_processes", 0), ("process_id", -1)):
        value = section[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append((field, f"must be an integer >= {low}, got {value!r}"))
    n, i = section.num_processes, section.process_id
    if isinstance(n, int) and isinstance(i, int) and n > 0 and i >= n:
        problems.append(("process_id", f"{i} is not below num_processes = {n}"))
    for field in ("initialization_timeout_s", "heartbeat_timeout_s"):
        value = section[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append((field, f"must be a whole number of seconds >= 1, got {value!r}"))
    return problems


def initialize(section: ml_collections.ConfigDict) -> bool:
    """Joins the multi-process runtime as ``section`` (``config.distributed``) says.

    Call it before anything else touches JAX (`fedsp.init_run` and `fedsp.run` do).
    Calling it again, or after JAX was initialised some other way, changes nothing.

    Returns:
      Whether this process is one of several.

    Raises:
      ValueError: a bad field (named ``distributed.<field>``), or JAX already started
        its backends in this process (the runtime must be joined before that).
      RuntimeError: the coordinator could not be reached within
        ``initialization_timeout_s`` (naming the address and this process's id).
    """
    problems = distributed_problems(section)
    if problems:
        raise ValueError("; ".join(f"distributed.{field}: {msg}" for field, msg in problems))
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    address = section.coordinator_address or os.environ.get(_ADDRESS_ENV, "")
    if section.initialize is False or (section.initialize == AUTO and not address):
        return False
    where = (
        f"coordinator {address or '(detected)'} as process "
        f"{section.process_id if section.process_id >= 0 else '(detected)'}"
    )
    try:
        jax.distributed.initialize(
            coordinator_address=address or None,
            num_processes=section.num_processes or None,
            process_id=None if section.process_id < 0 else section.process_id,
            coordinator_bind_address=section.coordinator_bind_address or None,
            initialization_timeout=section.initialization_timeout_s,
            heartbeat_timeout_seconds=section.heartbeat_timeout_s,
        )
    except RuntimeError as e:
        if "before any JAX" in str(e):
            raise ValueError(
                "distributed.initialize: JAX already ran a computation in this process; "
                "join the multi-process runtime first (fedsp.distributed.initialize(config."
                "distributed) at the start of the program)"
            ) from e
        raise RuntimeError(
            f"distributed: could not join the {where} within "
            f"distributed.initialization_timeout_s = {section.initialization_timeout_s} s: {e}"
        ) from e
    except ValueError as e:
        raise ValueError(
            f"distributed: cannot join the {where}: {e} (set distributed.coordinator_address, "
            "distributed.num_processes and distributed.process_id, or run where JAX detects "
            "them: Cloud TPU, SLURM, Open MPI)"
        ) from e
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes logs and run files."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Waits until every process reaches the point called ``name`` (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(tree: Any) -> Any:
    """``tree``'s arrays as numpy on every process, also those other hosts hold parts of.

    In a multi-process run every process must call it with the same arrays: an array
    sharded over other hosts' devices is gathered (a collective).
    """

    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def check_agreement(tree: Any, what: str) -> None:
    """Raises unless every process holds the same values of ``tree`` (host arrays).

    Compares a CRC32 of each leaf's bytes across processes (a few integers on the
    wire), so host-side work that should be identical everywhere (the packed client
    batches) cannot silently differ. A no-op in one process.

    Raises:
      RuntimeError: naming ``what``, when the processes' values differ.
    """
    if jax.process_count() == 1:
        return
    leaves = jax.tree_util.tree_flatten_with_path(to_host(tree))[0]
    digest = np.asarray(
        [zlib.crc32(np.ascontiguousarray(x).tobytes()) for _, x in leaves], np.int64
    )
    every = np.asarray(multihost_utils.process_allgather(digest))  # [processes, leaves]
    differ = [
        jax.tree_util.keystr(path)
        for (path, _), column in zip(leaves, every.T)
        if (column != column[0]).any()
    ]
    if differ:
        raise RuntimeError(
            f"the processes of this multi-host run computed different {what} (at "
            f"{', '.join(differ[:5])}): host-side work (sampling, feedback, packing) must "
            "be a function of (seed, round, client) only, or be computed once and broadcast"
        )


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """``tree``'s host values (numpy, or single-device arrays) placed with ``sharding``.

    Every process must pass the same values. Unlike ``jax.device_put`` in a
    multi-process run, nothing is compared across processes (a NaN would compare
    unequal), and typed PRNG keys keep their type.
    """

    def place(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                place(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree)


@contextlib.contextmanager
def stop_all_on_error() -> Iterator[None]:
    """In a multi-process run, an exception ends this process at once (after printing
    it), so the other processes fail within ``distributed.heartbeat_timeout_s`` instead
    of waiting at their next collective; in one process the exception propagates.

    The printed note says when the error came from another process dying.
    """
    try:
        yield
    except BaseException as e:
        if jax.process_count() == 1:
            raise
        message = str(e).lower()
        if any(word in message for word in _PEER_GONE):
            note = "another process of this multi-host run died or stopped answering"
        else:
            note = "stopping this process so that the others stop too"
        print(
            f"fedsp: process {jax.process_index()} of {jax.process_count()}: {note}; restart "
            "every process to resume from the newest checkpoint",
            file=sys.stderr,
        )
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


def _is_host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
