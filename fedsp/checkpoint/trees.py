"""The on-disk encoding of fedsp's Orbax checkpoints: a PyTree item and a JSON item.

Arrays (adapters, optimizer states, typed PRNG keys, numpy arrays, Python scalars) go
into an Orbax PyTree checkpointable; the JSON side (metadata and a signature of every
array leaf) into a JSON checkpointable of the same step, so both are committed together.
Restoring needs a template of the same structure: Orbax restores against its abstract
version, so optax NamedTuple states, ``nnx.State`` adapters and typed PRNG keys come back
as the same Python structure, dtype and sharding. A step whose files are deleted or
truncated raises `CorruptCheckpointError` naming it, and so does one whose array bytes
were overwritten: the JSON side holds a CRC-32 of every array leaf, checked on restore
(tensorstore's zstd chunks carry no checksum, so garbage inside a data file can decode
to other numbers without an error).

`save_tree` / `load_tree` write and read one directory (the player pool's entries);
`fedsp.checkpoint.run_state` uses the same encoding for its per-round steps.
"""

from __future__ import annotations

import numbers
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from etils import epath
from flax import nnx

PyTree = Any
JsonValue = Any

_FORMAT = 1
_TREE = "state"
_META = "meta"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (deleted, truncated or unparsable files)."""


# --------------------------------------------------------------------------- JSON side


def to_json(value: Any, name: str) -> JsonValue:
    """Returns ``value`` as plain JSON types; numpy/jax scalars become Python numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        return to_json(np.asarray(value).item(), name)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{name} must have str keys, got key {key!r}")
            out[key] = to_json(item, f"{name}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(item, f"{name}[{i}]") for i, item in enumerate(value)]
    raise ValueError(
        f"{name} must be JSON-serializable (None, bool, numbers, str, lists, dicts with str "
        f"keys, or scalar arrays), got {type(value).__name__}"
    )


# --------------------------------------------------------------------------- tree codec


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_node(x: Any) -> bool:
    """Leaves of the caller's tree that the codec rewrites: nnx.State and typed keys."""
    return isinstance(x, nnx.State) or _is_typed_key(x)


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _encode(tree: PyTree) -> PyTree:
    """The tree Orbax stores: nnx.State → pure dict, typed key → its uint32 key data."""

    def encode(x: Any) -> Any:
        if isinstance(x, nnx.State):
            return _encode(nnx.to_pure_dict(x))
        if _is_typed_key(x):
            if isinstance(x, jax.ShapeDtypeStruct):
                data = jax.eval_shape(jax.random.key_data, x)
                return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
            return jax.random.key_data(x)
        if isinstance(x, np.generic):
            # Orbax has no handler for numpy scalars; a 0-d array round-trips them.
            return np.asarray(x)
        return x

    return jax.tree.map(encode, tree, is_leaf=_is_node)


def _abstract_leaf(x: Any, path: str) -> Any:
    """Orbax's abstract leaf: restore as this type, shape, dtype (and sharding)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or _default_sharding())
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return np.empty(x.shape, x.dtype)
    if isinstance(x, (bool, int, float)):
        return type(x)
    raise ValueError(
        f"leaf {path} has unsupported type {type(x).__name__}; expected jax/numpy arrays, "
        "Python int/float/bool, jax.ShapeDtypeStruct, typed PRNG keys or nnx.State"
    )


def _abstract(encoded: PyTree) -> PyTree:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _abstract_leaf(x, jax.tree_util.keystr(p)), encoded
    )


def _signature(abstract: PyTree) -> dict[str, str]:
    """``{leaf path: "float32[2, 3]" | "int" ...}``: what a template must match."""

    def describe(x: Any) -> str:
        if isinstance(x, type):
            return x.__name__
        return f"{np.dtype(x.dtype).name}{list(x.shape)}"

    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {jax.tree_util.keystr(p): describe(x) for p, x in leaves}


def _check_signature(saved: Mapping[str, str], expected: Mapping[str, str], where: str) -> None:
    problems = []
    for key in sorted(set(saved) | set(expected)):
        if key not in expected:
            problems.append(f"{key} is in the checkpoint but not in the template")
        elif key not in saved:
            problems.append(f"{key} is in the template but not in the checkpoint")
        elif saved[key] != expected[key]:
            problems.append(
                f"{key} is {saved[key]} in the checkpoint, {expected[key]} in the template"
            )
    if problems:
        shown = "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
        raise ValueError(f"template does not match {where}: {shown}")


def _local_bytes(x: Any) -> np.ndarray | None:
    """A leaf's bytes as this process holds them whole, or None if it holds a part only
    (an array sharded over other hosts' devices)."""
    if isinstance(x, jax.Array):
        if x.is_fully_addressable:
            x = np.asarray(x)
        elif x.is_fully_replicated:
            x = np.asarray(x.addressable_shards[0].data)
        else:
            return None
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _checksums(encoded: PyTree) -> dict[str, str]:
    """``{leaf path: CRC-32 of its bytes}`` for the leaves this process holds whole."""
    sums = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(encoded)[0]:
        data = _local_bytes(leaf)
        if data is not None:
            sums[jax.tree_util.keystr(path)] = f"{zlib.crc32(data.tobytes()):08x}"
    return sums


def _check_checksums(saved: Mapping[str, str], restored: PyTree, where: str) -> None:
    read = _checksums(restored)
    bad = [k for k in sorted(saved) if k in read and read[k] != saved[k]]
    if bad:
        shown = ", ".join(bad[:6]) + (", ..." if len(bad) > 6 else "")
        raise CorruptCheckpointError(
            f"{where} is corrupt: the data of {shown} does not match the CRC-32 saved with it"
        )


def _decode(template: PyTree, restored: PyTree) -> PyTree:
    """Rebuilds the template's Python structure (nnx.State, typed keys) around ``restored``."""

    def decode(t: Any, r: Any) -> Any:
        if isinstance(t, nnx.State):
            out = jax.tree.map(lambda v: v, t)  # fresh Variables; the template is untouched
            nnx.replace_by_pure_dict(out, _decode(nnx.to_pure_dict(t), r))
            return out
        if _is_typed_key(t):
            # key_impl needs a concrete key; a zero key of the template's dtype is one.
            impl = jax.random.key_impl(jnp.zeros((), t.dtype))
            return jax.random.wrap_key_data(r, impl=impl)
        if isinstance(t, np.generic):
            return np.asarray(r, t.dtype)[()]
        if isinstance(t, jax.Array) and not getattr(t, "committed", True):
            # Orbax places restored arrays on a device (committed); a template that was not
            # placed restores unplaced too, so a resumed run hits the jit caches of a fresh
            # one (commitment is part of the cache key) instead of recompiling everything.
            return jnp.asarray(np.asarray(r))
        return r

    return jax.tree.map(decode, template, restored, is_leaf=_is_node)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception of a chain, on one line: Orbax wraps the useful one."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(exc).__name__}: {text}"


def orbax_context() -> ocp.Context:
    """Orbax context that saves the ``meta`` checkpointable as a plain JSON file."""
    registry = ocp.handlers.local_registry()
    registry.add(ocp.handlers.JsonHandler, checkpointable_name=_META)
    context = ocp.Context()
    context.checkpointables.registry = registry
    return context


def checkpointables(tree: PyTree, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Orbax checkpointables of one step: ``tree``'s arrays and the JSON side
    (format, leaf signature, ``meta``)."""
    encoded = _encode(tree)
    body = {
        "format": _FORMAT,
        "signature": _signature(_abstract(encoded)),
        # Optional in format 1: checkpoints written before it are read unchecked.
        "checksums": _checksums(encoded),
        "meta": to_json(dict(meta or {}), "meta"),
    }
    items: dict[str, Any] = {_META: body}
    if jax.tree.leaves(encoded):
        items[_TREE] = encoded
    return items


# (abstract checkpointables) -> loaded checkpointables, for one step of one directory.
Loader = Callable[[dict[str, Any]], dict[str, Any]]


def read_meta(load: Loader, where: str) -> dict[str, Any]:
    """The JSON side of a step (raises `CorruptCheckpointError` naming ``where``)."""
    try:
        body = load({_META: None})[_META]
    except Exception as e:  # any failure to read means a damaged step
        raise CorruptCheckpointError(f"{where} is corrupt or incomplete: {_root_cause(e)}") from e
    if not isinstance(body, dict) or body.get("format") != _FORMAT or "signature" not in body:
        raise CorruptCheckpointError(
            f"{where} has no fedsp metadata of format {_FORMAT} (got {str(body)[:200]})"
        )
    return body


def read_tree(load: Loader, where: str, template: PyTree, body: Mapping[str, Any]) -> PyTree:
    """A step's arrays in ``template``'s structure, checked against ``body``'s signature."""
    encoded = _encode(template)
    abstract = _abstract(encoded)
    _check_signature(body["signature"], _signature(abstract), where)
    if not jax.tree.leaves(encoded):
        return _decode(template, encoded)
    try:
        restored = load({_TREE: abstract})[_TREE]
    except Exception as e:
        raise CorruptCheckpointError(f"{where} is corrupt or incomplete: {_root_cause(e)}") from e
    _check_checksums(body.get("checksums", {}), restored, where)
    return _decode(template, restored)


def save_tree(
    path: os.PathLike | str, tree: PyTree, *, meta: Mapping[str, Any] | None = None
) -> None:
    """Saves ``tree`` (and JSON ``meta``) atomically as an Orbax checkpoint at ``path``.

    Raises:
      ValueError: if ``path`` exists, a leaf has an unsupported type, or ``meta`` is not
        JSON-serializable.
    """
    directory = epath.Path(path)
    if directory.exists():
        raise ValueError(f"path {directory} already exists")
    items = checkpointables(tree, meta)
    with orbax_context():
        ocp.save_checkpointables(directory, items)


def load_tree(path: os.PathLike | str, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Loads a `save_tree` checkpoint into the structure of ``template``.

    Returns:
      ``(tree, meta)``: the tree with the template's structure, dtypes and shardings, and
      the JSON meta saved with it.

    Raises:
      CorruptCheckpointError: if ``path`` is missing or its files cannot be read.
      ValueError: if ``template`` does not match the saved leaves (named in the message).
    """
    directory = epath.Path(path)
    where = f"checkpoint {directory}"
    if not directory.exists():
        raise CorruptCheckpointError(f"{where} is missing")

    def load(abstract_checkpointables: dict[str, Any]) -> dict[str, Any]:
        with orbax_context():
            return ocp.load_checkpointables(directory, abstract_checkpointables)

    body = read_meta(load, where)
    return read_tree(load, where, template, body), body["meta"]


def load_meta(path: os.PathLike | str) -> dict[str, Any]:
    """The JSON meta of a `save_tree` checkpoint, without reading its arrays."""
    directory = epath.Path(path)
    where = f"checkpoint {directory}"
    if not directory.exists():
        raise CorruptCheckpointError(f"{where} is missing")
    with orbax_context():
        return read_meta(lambda a: ocp.load_checkpointables(directory, a), where)["meta"]


def quarantine(path: os.PathLike | str) -> epath.Path:
    """Renames a damaged checkpoint to ``<name>.corrupt[.N]`` so listings skip it."""
    directory = epath.Path(path)
    target = directory.parent / f"{directory.name}.corrupt"
    n = 0
    while target.exists():
        n += 1
        target = directory.parent / f"{directory.name}.corrupt.{n}"
    directory.rename(target)
    return target
