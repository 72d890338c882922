"""Adapters and scalars on Flower's wire: pytrees as `ArrayRecord`s, and the check that a
client's reply holds nothing but arrays and numbers.

An adapter tree travels as one `ArrayRecord` whose keys are the leaves' pytree paths
(``jax.tree_util.keystr``) in the tree's own order; the receiver rebuilds it on a tree of
the same structure it already has (its own adapters), so no structure is sent and a
missing, extra or reshaped leaf is an error naming the key. NumPy's ``.npy`` format has no
bfloat16, so a bfloat16 leaf is sent as its uint16 bits with ``dtype="bfloat16"``; every
dtype round-trips exactly.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = [
    "check_reply",
    "metrics_record",
    "record_to_tree",
    "scalar",
    "tree_to_record",
]

PyTree = Any
_BF16 = "bfloat16"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def tree_to_record(tree: PyTree) -> ArrayRecord:
    """``tree``'s leaves as an `ArrayRecord` keyed by pytree path."""
    record = ArrayRecord()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        value = np.asarray(jax.device_get(leaf))
        if value.dtype == ml_dtypes.bfloat16:
            bits = np.asarray(value, order="C").view(np.uint16)
            record[jax.tree_util.keystr(path)] = Array(
                dtype=_BF16, shape=tuple(value.shape), stype="numpy.ndarray", data=_npy(bits)
            )
        else:
            record[jax.tree_util.keystr(path)] = Array(np.asarray(value, order="C"))
    return record


def record_to_tree(record: ArrayRecord, like: PyTree, *, name: str = "arrays") -> PyTree:
    """The tree of ``like``'s structure, shapes and dtypes with ``record``'s values.

    Raises:
      ValueError: ``record`` lacks a leaf of ``like``, has one ``like`` has not, or a
        leaf's shape or dtype differs (the message names ``name`` and the key).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    keys = [jax.tree_util.keystr(path) for path, _ in leaves]
    missing = [k for k in keys if k not in record]
    extra = sorted(set(record.keys()) - set(keys))
    if missing or extra:
        raise ValueError(f"{name}: missing leaves {missing[:5]}, unexpected leaves {extra[:5]}")
    out = []
    for key, (_, ref) in zip(keys, leaves):
        array = record[key]
        value = np.load(io.BytesIO(array.data), allow_pickle=False)
        if array.dtype == _BF16:
            value = value.view(ml_dtypes.bfloat16)
        ref_dtype = np.dtype(getattr(ref, "dtype", np.asarray(ref).dtype))
        if value.shape != tuple(np.shape(ref)) or value.dtype != ref_dtype:
            raise ValueError(
                f"{name}{key}: got {value.dtype}{list(value.shape)}, expected "
                f"{ref_dtype}{list(np.shape(ref))}"
            )
        out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out)


def scalar(record: Any, key: str) -> float:
    """The number ``record[key]`` of a `ConfigRecord` or `MetricRecord`.

    Raises:
      ValueError: ``record`` is no such record, lacks ``key``, or holds no number there.
    """
    if not isinstance(record, (ConfigRecord, MetricRecord)):
        raise ValueError(f"expected a ConfigRecord or MetricRecord holding {key!r}")
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"record field {key!r} must be a number, got {value!r}")
    return float(value)


def metrics_record(values: Mapping[str, Any]) -> MetricRecord:
    """``values`` (scalars or [n] arrays of numbers) as a `MetricRecord`; NaN stays NaN."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
            raise TypeError(f"metric {key!r} is not a number: {type(value).__name__}")
        if arr.ndim == 0:
            out[key] = int(arr) if np.issubdtype(arr.dtype, np.integer) else float(arr)
        else:
            out[key] = [float(x) for x in arr.reshape(-1)]
    return MetricRecord(out)


def check_reply(content: RecordDict, allowed_metrics: Iterable[str] | None = None) -> None:
    """Privacy invariant of a client's reply: only `ArrayRecord`s (numeric arrays) and
    `MetricRecord`s (numbers; with ``allowed_metrics``, only those keys); no
    `ConfigRecord`, the one record that can carry strings.

    Raises:
      TypeError: the reply carries a string or a record of another kind, naming it.
    """
    allowed = None if allowed_metrics is None else set(allowed_metrics)
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            for key, array in record.items():
                if array.dtype != _BF16 and not np.issubdtype(np.dtype(array.dtype), np.number):
                    raise TypeError(f"reply record {name!r}[{key!r}] has dtype {array.dtype}")
        elif isinstance(record, MetricRecord):
            unknown = [] if allowed is None else sorted(set(record.keys()) - allowed)
            if unknown:
                raise TypeError(f"reply record {name!r} has unexpected metric keys {unknown}")
        elif isinstance(record, ConfigRecord):
            raise TypeError(f"reply record {name!r} is a ConfigRecord (it can carry text)")
        else:
            raise TypeError(f"reply record {name!r} is a {type(record).__name__}")
