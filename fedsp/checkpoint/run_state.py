"""Run-state checkpoints for exact resume of a federated run (Orbax v1).

At the end of round r the round loop saves everything the next round reads:

    with RunCheckpointer(workdir / "checkpoints", keep=2, fingerprint=fp) as ckpt:
        if ckpt.latest_round() is not None:
            state = ckpt.restore_latest_valid(template)   # template: a fresh RoundState
        ...
        ckpt.save(RoundState(round=r, params=..., opt_state=..., rng=..., ...))

Arrays (server adapters, the server optimizer state, the RNG key, baselines, sampler
state) go into an Orbax PyTree checkpointable; the JSON side of the state (round,
metrics history, player-pool index, config fingerprint, and a signature of every array
leaf) goes into a JSON checkpointable of the same step, so both are committed together.

Restoring needs a template of the same structure built by the caller (e.g. the state a
fresh run starts from, or ``jax.eval_shape`` of it): Orbax restores against its
abstract version, so optax NamedTuple states, ``nnx.State`` adapters and typed PRNG keys
come back as the same Python structure, dtype and sharding. Leaves may be ``jax.Array``
(typed keys included), ``numpy`` arrays or scalars, Python ``int``/``float``/``bool``,
or ``jax.ShapeDtypeStruct`` in a template.

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when
complete (``AtomicityMode.AUTO`` picks the rename on POSIX file systems), so a crash
mid-save leaves the previous step loadable; listings ignore the partial directory and
the next `RunCheckpointer` on the directory removes it. A step whose files are deleted
or truncated raises `CorruptCheckpointError` naming it; `RunCheckpointer.restore_latest_valid`
then falls back to the newest readable step.

`save_tree` / `load_tree` give the same encoding for a single directory (the player
pool stores its entries with them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from etils import epath
from flax import nnx

PyTree = Any
JsonValue = Any

# Bumped when the on-disk layout changes; restore refuses other formats.
_FORMAT = 1
_TREE = "state"
_META = "meta"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read (deleted, truncated or unparsable files)."""


# --------------------------------------------------------------------------- JSON side


def _jsonable(value: Any, name: str) -> JsonValue:
    """Returns ``value`` as plain JSON types; numpy/jax scalars become Python numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        return _jsonable(np.asarray(value).item(), name)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{name} must have str keys, got key {key!r}")
            out[key] = _jsonable(item, f"{name}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{name}[{i}]") for i, item in enumerate(value)]
    raise ValueError(
        f"{name} must be JSON-serializable (None, bool, numbers, str, lists, dicts with str "
        f"keys, or scalar arrays), got {type(value).__name__}"
    )


def config_fingerprint(config: Any, *, ignore: Iterable[str] = ()) -> dict[str, JsonValue]:
    """Flattens a nested config into ``{"dotted.field": value}`` for resume checks.

    Args:
      config: a mapping, an ``ml_collections.ConfigDict`` (anything with ``to_dict()``),
        or a dataclass instance, possibly nested.
      ignore: dotted field names (or prefixes of them, ``"eval"`` drops ``eval.*``) left
        out: fields a resumed run may change, such as the total number of rounds.

    Returns:
      A flat dict of JSON values (tuples become lists; other objects their ``repr``).
    """
    ignore = tuple(ignore)
    flat: dict[str, JsonValue] = {}

    def visit(node: Any, prefix: str) -> None:
        if hasattr(node, "to_dict") and callable(node.to_dict):
            node = node.to_dict()
        elif dataclasses.is_dataclass(node) and not isinstance(node, type):
            node = {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
        if isinstance(node, Mapping):
            for key, item in node.items():
                visit(item, f"{prefix}.{key}" if prefix else str(key))
            return
        if any(prefix == skip or prefix.startswith(skip + ".") for skip in ignore):
            return
        try:
            flat[prefix] = _jsonable(node, prefix)
        except ValueError:
            flat[prefix] = repr(node)

    visit(config, "")
    return flat


def _fingerprint_diff(
    saved: Mapping[str, JsonValue], current: Mapping[str, JsonValue]
) -> list[str]:
    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, missing), current.get(key, missing)
        if old != new and not (_is_nan(old) and _is_nan(new)):
            show = lambda v: "<absent>" if v is missing else json.dumps(v)  # noqa: E731
            diffs.append(f"{key} (checkpoint {show(old)}, now {show(new)})")
    return diffs


def _is_nan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


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


def _context() -> ocp.Context:
    """Orbax context that saves the ``meta`` checkpointable as a plain JSON file."""
    registry = ocp.handlers.local_registry()
    registry.add(ocp.handlers.JsonHandler, checkpointable_name=_META)
    context = ocp.Context()
    context.checkpointables.registry = registry
    return context


def _checkpointables(tree: PyTree, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    encoded = _encode(tree)
    body = {
        "format": _FORMAT,
        "signature": _signature(_abstract(encoded)),
        "meta": _jsonable(dict(meta or {}), "meta"),
    }
    checkpointables: dict[str, Any] = {_META: body}
    if jax.tree.leaves(encoded):
        checkpointables[_TREE] = encoded
    return checkpointables


Loader = Callable[[dict[str, Any]], dict[str, Any]]


def _read_meta(load: Loader, where: str) -> dict[str, Any]:
    try:
        body = load({_META: None})[_META]
    except Exception as e:  # noqa: BLE001 - any failure to read means a damaged step
        raise CorruptCheckpointError(f"{where} is corrupt or incomplete: {_root_cause(e)}") from e
    if not isinstance(body, dict) or body.get("format") != _FORMAT or "signature" not in body:
        raise CorruptCheckpointError(
            f"{where} has no fedsp metadata of format {_FORMAT} (got {str(body)[:200]})"
        )
    return body


def _read_tree(load: Loader, where: str, template: PyTree, body: Mapping[str, Any]) -> PyTree:
    encoded = _encode(template)
    abstract = _abstract(encoded)
    _check_signature(body["signature"], _signature(abstract), where)
    if not jax.tree.leaves(encoded):
        return _decode(template, encoded)
    try:
        restored = load({_TREE: abstract})[_TREE]
    except Exception as e:  # noqa: BLE001
        raise CorruptCheckpointError(f"{where} is corrupt or incomplete: {_root_cause(e)}") from e
    return _decode(template, restored)


def save_tree(
    path: os.PathLike | str, tree: PyTree, *, meta: Mapping[str, Any] | None = None
) -> None:
    """Saves ``tree`` (and JSON ``meta``) atomically as an Orbax checkpoint at ``path``.

    Raises:
      ValueError: if ``path`` exists, a leaf has an unsupported type, or ``meta`` is not
        JSON-serializable.
    """
    path = epath.Path(path)
    if path.exists():
        raise ValueError(f"path {path} already exists")
    checkpointables = _checkpointables(tree, meta)
    with _context():
        ocp.save_checkpointables(path, checkpointables)


def load_tree(path: os.PathLike | str, template: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Loads a `save_tree` checkpoint into the structure of ``template``.

    Returns:
      ``(tree, meta)``: the tree with the template's structure, dtypes and shardings, and
      the JSON meta saved with it.

    Raises:
      CorruptCheckpointError: if ``path`` is missing or its files cannot be read.
      ValueError: if ``template`` does not match the saved leaves (named in the message).
    """
    path = epath.Path(path)
    where = f"checkpoint {path}"
    if not path.exists():
        raise CorruptCheckpointError(f"{where} is missing")

    def load(abstract_checkpointables: dict[str, Any]) -> dict[str, Any]:
        with _context():
            return ocp.load_checkpointables(path, abstract_checkpointables)

    body = _read_meta(load, where)
    return _read_tree(load, where, template, body), body["meta"]


def load_meta(path: os.PathLike | str) -> dict[str, Any]:
    """The JSON meta of a `save_tree` checkpoint, without reading its arrays."""
    path = epath.Path(path)
    where = f"checkpoint {path}"
    if not path.exists():
        raise CorruptCheckpointError(f"{where} is missing")
    with _context():
        return _read_meta(lambda a: ocp.load_checkpointables(path, a), where)["meta"]


def quarantine(path: os.PathLike | str) -> epath.Path:
    """Renames a damaged checkpoint to ``<name>.corrupt[.N]`` so listings skip it."""
    path = epath.Path(path)
    target = path.parent / f"{path.name}.corrupt"
    n = 0
    while target.exists():
        n += 1
        target = path.parent / f"{path.name}.corrupt.{n}"
    path.rename(target)
    return target


# --------------------------------------------------------------------------- run state


@dataclasses.dataclass(frozen=True)
class RoundState:
    """Everything a federated run needs to continue exactly after round ``round``: what
    a run checkpoint holds (`fedsp.RunState` adds the run's fixed context to it).

    Attributes:
      round: the last completed round; it is the checkpoint's step.
      params: server parameters (the LoRA adapters: an ``nnx.State`` or a pytree).
      opt_state: the server optimizer's state (e.g. optax NamedTuples).
      rng: the run's PRNG key (typed ``jax.random.key`` or raw uint32 key data).
      baselines: reward baselines (e.g. per-client EMA [C]) or None.
      sampler_state: client-sampler / data-iterator arrays, or None.
      pool: the player pool's ``state_dict()`` (JSON), or None.
      metrics_history: one dict of float metrics per completed round.
    """

    round: int
    params: PyTree
    opt_state: PyTree
    rng: PyTree
    baselines: PyTree = None
    sampler_state: PyTree = None
    pool: Mapping[str, Any] | None = None
    metrics_history: Sequence[Mapping[str, Any]] = ()

    def arrays(self) -> dict[str, PyTree]:
        """The array fields, as stored in the checkpoint's PyTree item."""
        return {
            "params": self.params,
            "opt_state": self.opt_state,
            "rng": self.rng,
            "baselines": self.baselines,
            "sampler_state": self.sampler_state,
        }


class RunCheckpointer:
    """Saves one `RoundState` per round with Orbax, keeping the last ``keep`` rounds.

    Args:
      directory: where the round checkpoints live (``<directory>/<round>/``).
      keep: how many of the newest rounds to keep on disk (≥ 1); keep ≥ 2 leaves a
        fallback when the newest one is damaged.
      fingerprint: a flat dict describing the run's config (see `config_fingerprint`).
        It is saved with every round; restoring a round saved with a different one
        raises ValueError naming the fields that differ. None skips the check.
    """

    def __init__(
        self,
        directory: os.PathLike | str,
        *,
        keep: int = 2,
        fingerprint: Mapping[str, Any] | None = None,
    ):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self._keep = keep
        self._fingerprint = (
            None if fingerprint is None else _jsonable(dict(fingerprint), "fingerprint")
        )
        self._checkpointer = ocp.training.Checkpointer(
            epath.Path(directory),
            context=_context(),
            preservation_policy=ocp.training.preservation_policies.LatestN(keep),
            # Removes the <step>.orbax-checkpoint-tmp directories of a crashed save.
            cleanup_tmp_directories=True,
        )

    @property
    def directory(self) -> epath.Path:
        return epath.Path(self._checkpointer.directory)

    @property
    def keep(self) -> int:
        return self._keep

    def rounds(self) -> list[int]:
        """The rounds with a committed checkpoint, ascending."""
        return [c.step for c in self._checkpointer.checkpoints]

    def latest_round(self) -> int | None:
        """The newest committed round, or None if there is none."""
        latest = self._checkpointer.latest
        return None if latest is None else latest.step

    def path(self, round: int) -> epath.Path:  # noqa: A002 - the papers' word
        """The directory of round ``round``'s checkpoint."""
        return self.directory / str(round)

    def save(self, state: RoundState) -> epath.Path:
        """Saves ``state`` as step ``state.round``; older rounds beyond ``keep`` are deleted.

        Returns:
          The round's checkpoint directory.

        Raises:
          ValueError: if ``state.round`` is negative or already saved, a leaf has an
            unsupported type, or the JSON fields are not serializable.
        """
        if not isinstance(state, RoundState):
            raise ValueError(f"state must be a RoundState, got {type(state).__name__}")
        if (
            isinstance(state.round, bool)
            or not isinstance(state.round, numbers.Integral)
            or state.round < 0
        ):
            raise ValueError(f"state.round must be an int >= 0, got {state.round!r}")
        step = int(state.round)
        if step in self.rounds():
            raise ValueError(
                f"round {step} is already saved in {self.directory} (rounds {self.rounds()}); "
                "resume from the latest round or use a new directory"
            )
        meta = {
            "round": step,
            "fingerprint": self._fingerprint,
            "pool": _jsonable(state.pool, "state.pool"),
            "metrics_history": _jsonable(list(state.metrics_history), "state.metrics_history"),
        }
        self._checkpointer.save_checkpointables(
            step, _checkpointables(state.arrays(), meta), force=True
        )
        return self.path(step)

    def _loader(self, step: int) -> Loader:
        return lambda abstract: self._checkpointer.load_checkpointables(step, abstract)

    def restore(self, template: RoundState, round: int | None = None) -> RoundState:  # noqa: A002
        """Restores round ``round`` (default: the newest) into the structure of ``template``.

        Args:
          template: a RoundState whose array fields have the saved structure, e.g. the
            state a fresh run starts from (its values are not read; its ``round``,
            ``pool`` and ``metrics_history`` are ignored).
          round: which round; None means `latest_round()`.

        Raises:
          FileNotFoundError: if there is no checkpoint (or none for ``round``).
          CorruptCheckpointError: if the round's files cannot be read.
          ValueError: if the config fingerprint or the template does not match.
        """
        if not isinstance(template, RoundState):
            raise ValueError(f"template must be a RoundState, got {type(template).__name__}")
        rounds = self.rounds()
        step = rounds[-1] if (round is None and rounds) else round
        if step not in rounds:
            raise FileNotFoundError(
                f"no checkpoint for round {round if round is not None else '(latest)'} in "
                f"{self.directory}; saved rounds: {rounds}"
            )
        where = f"run checkpoint of round {step} at {self.path(step)}"
        body = _read_meta(self._loader(step), where)
        meta = body["meta"]
        saved_fp = meta.get("fingerprint")
        if self._fingerprint is not None and saved_fp is not None:
            diffs = _fingerprint_diff(saved_fp, self._fingerprint)
            if diffs:
                raise ValueError(
                    f"config fingerprint differs from the {where} in field(s): " + "; ".join(diffs)
                )
        arrays = _read_tree(self._loader(step), where, template.arrays(), body)
        return RoundState(
            round=int(meta["round"]),
            pool=meta.get("pool"),
            metrics_history=tuple(meta.get("metrics_history", ())),
            **arrays,
        )

    def restore_latest_valid(self, template: RoundState) -> RoundState:
        """Restores the newest readable round, moving damaged newer ones aside.

        Each damaged round is renamed to ``<round>.corrupt`` (kept for inspection, no
        longer listed) with a warning, so the resumed run saves its next rounds normally.

        Raises:
          FileNotFoundError: if there is no checkpoint.
          CorruptCheckpointError: if no round can be read (all of them are listed).
          ValueError: on a fingerprint or template mismatch (not a fallback case).
        """
        rounds = self.rounds()
        if not rounds:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors = []
        for step in reversed(rounds):
            try:
                state = self.restore(template, step)
            except CorruptCheckpointError as e:
                errors.append(str(e))
                continue
            if errors:
                self._quarantine([r for r in rounds if r > step])
                warnings.warn(
                    f"resumed from round {step}: newer round(s) could not be read and were "
                    "renamed to <round>.corrupt: " + " | ".join(errors),
                    stacklevel=2,
                )
            return state
        raise CorruptCheckpointError(
            f"no readable checkpoint in {self.directory}: " + " | ".join(errors)
        )

    def _quarantine(self, steps: Sequence[int]) -> None:
        for step in steps:
            quarantine(self.path(step))
        self._checkpointer.reload()

    def close(self) -> None:
        """Waits for pending Orbax work and releases its threads."""
        self._checkpointer.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
