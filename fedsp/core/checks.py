"""Shape and argument validation for the `fedsp.core` functions, at their boundaries.

Every public core function validates its inputs here and raises ValueError with a
message that names the argument and the expected shape, e.g.
``players_pos must have shape [J, B] = [3, 4], got (3, 5)``, so a wrong shape in a
caller's code reads as a usage error. chex's assertions would raise AssertionError
naming only the position ("input 0 has shape (3, 5)"): the tests use chex, the
library does not.

Every check reads only static information (shapes, dtypes, Python numbers), so the
same validation runs eagerly and at trace time under `jax.jit`. Values that are traced
(hyper-parameters passed as arrays into a jitted function) are not range-checked: their
value is not known while tracing.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Any, cast

import jax.numpy as jnp


def _format_expected(dims: str, shape: Sequence[int | None]) -> str:
    letters = [d.strip() for d in dims.split(",")] if dims else []
    if len(letters) != len(shape):
        raise ValueError(f"dims {dims!r} does not name {len(shape)} axes")
    sizes = ", ".join(str(s) if s is not None else letter for s, letter in zip(shape, letters))
    return f"[{dims}] = [{sizes}]"


def check_rank(name: str, x: Any, rank: int, dims: str | None = None) -> None:
    """Raises ValueError unless ``x`` has ``rank`` axes; ``dims`` names them ("B, T")."""
    ndim = jnp.ndim(x)
    if ndim != rank:
        what = f" [{dims}]" if dims else ""
        raise ValueError(f"{name} must have rank {rank}{what}, got shape {tuple(jnp.shape(x))}")


def check_shape(name: str, x: Any, dims: str, shape: Sequence[int | None]) -> None:
    """Raises ValueError unless ``x.shape`` matches ``shape`` (None matches any size).

    Args:
      name: the argument's name, used in the message.
      x: the array to check.
      dims: comma-separated axis names for the message, e.g. ``"J, B"``.
      shape: the expected sizes, one per axis; None leaves that axis free.
    """
    actual = tuple(jnp.shape(x))
    ok = len(actual) == len(shape) and all(
        want is None or want == got for want, got in zip(shape, actual)
    )
    if not ok:
        raise ValueError(f"{name} must have shape {_format_expected(dims, shape)}, got {actual}")


def check_same_shape(names: Sequence[str], *xs: Any) -> None:
    """Raises ValueError unless all ``xs`` have the same shape; ``names`` label them."""
    if len(names) != len(xs):
        raise ValueError(f"check_same_shape got {len(names)} names for {len(xs)} arrays")
    shapes = [tuple(jnp.shape(x)) for x in xs]
    if any(s != shapes[0] for s in shapes[1:]):
        listing = ", ".join(f"{n}={s}" for n, s in zip(names, shapes))
        raise ValueError(f"{', '.join(names)} must have the same shape, got {listing}")


def check_integer(name: str, x: Any) -> None:
    """Raises ValueError unless ``x`` has an integer dtype (token ids, counts)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"{name} must have an integer dtype, got {jnp.result_type(x)}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises ValueError unless ``value`` is one of ``choices`` (listed in the message)."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_interval(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises ValueError if a concrete number lies outside [low, high] (or open ends).

    Traced values and arrays are skipped: only Python and NumPy scalars are checked.
    """
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return
    # numbers.Real declares only < and <= (its stubs too); every concrete real type also
    # has > and >=, which the upper bound needs.
    number = cast(float, value)
    bad_low = low is not None and (number <= low if low_open else number < low)
    bad_high = high is not None and (number >= high if high_open else number > high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else str(low)
        hi = "inf" if high is None else str(high)
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        interval = f"{left}{lo}, {hi}{right}"
        raise ValueError(f"{name} must lie in {interval}, got {value}")


def upcast_float(x: Any) -> jnp.ndarray:
    """Returns ``x`` as a floating array of at least float32 precision.

    bf16/fp16 inputs become float32 (log-probs and losses are accumulated in float32);
    float64 stays float64 so that gradient checks under x64 keep their precision.
    """
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def as_bool_mask(name: str, mask: Any) -> jnp.ndarray:
    """Returns a 0/1 float or bool ``mask`` as bool (nonzero = valid)."""
    mask = jnp.asarray(mask)
    if not (jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.number)):
        raise ValueError(f"{name} must be a bool or 0/1 numeric mask, got dtype {mask.dtype}")
    return mask.astype(bool)
