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
the next `RunCheckpointer` on the directory removes it; older steps beyond ``keep`` are
deleted only after the new one is committed. A step whose files are deleted, truncated or
overwritten (a CRC-32 of every array is saved on the JSON side) raises
`CorruptCheckpointError` naming it; `RunCheckpointer.restore_latest_valid` then moves it
aside, logs a warning naming it, and falls back to the newest readable step.

`save_tree` / `load_tree` give the same encoding for a single directory (the player
pool stores its entries with them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orbax.checkpoint.experimental.v1 as ocp
from etils import epath

from fedsp.checkpoint.trees import (
    CorruptCheckpointError,
    JsonValue,
    Loader,
    PyTree,
    checkpointables,
    orbax_context,
    quarantine,
    read_meta,
    read_tree,
    to_json,
)
from fedsp.distributed import is_main_process, sync

_log = logging.getLogger(__name__)


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
            flat[prefix] = to_json(node, prefix)
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


def _join_orbax_threads(timeout_s: float) -> None:
    """Waits, at most ``timeout_s`` in all, for Orbax's live non-daemon threads to end."""
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if (
            thread is not threading.current_thread()
            and not thread.daemon
            and type(thread).__module__.startswith("orbax.")
        ):
            # Orbax's threads re-raise their own error from join(): already reported.
            with contextlib.suppress(Exception):
                thread.join(max(0.0, deadline - time.monotonic()))


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
            None if fingerprint is None else to_json(dict(fingerprint), "fingerprint")
        )
        self._checkpointer = ocp.training.Checkpointer(
            epath.Path(directory),
            context=orbax_context(),
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

    def path(self, round: int) -> epath.Path:  # `round` (shadowing the builtin) is the papers' word
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
            "pool": to_json(state.pool, "state.pool"),
            "metrics_history": to_json(list(state.metrics_history), "state.metrics_history"),
        }
        items = checkpointables(state.arrays(), meta)
        try:
            self._checkpointer.save_checkpointables(step, items, force=True)
        except Exception:
            # Orbax raises the first error of its writer threads while the others are still
            # failing and logging theirs (screens of them on a full disk): let them end, so
            # the caller's report of the failure comes after them, not above them.
            _join_orbax_threads(timeout_s=10.0)
            raise
        return self.path(step)

    def _loader(self, step: int) -> Loader:
        return lambda abstract: self._checkpointer.load_checkpointables(step, abstract)

    def restore(self, template: RoundState, round: int | None = None) -> RoundState:
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
        body = read_meta(self._loader(step), where)
        meta = body["meta"]
        saved_fp = meta.get("fingerprint")
        if self._fingerprint is not None and saved_fp is not None:
            diffs = _fingerprint_diff(saved_fp, self._fingerprint)
            if diffs:
                raise ValueError(
                    f"config fingerprint differs from the {where} in field(s): " + "; ".join(diffs)
                )
        arrays = read_tree(self._loader(step), where, template.arrays(), body)
        return RoundState(
            round=int(meta["round"]),
            pool=meta.get("pool"),
            metrics_history=tuple(meta.get("metrics_history", ())),
            **arrays,
        )

    def restore_latest_valid(self, template: RoundState) -> RoundState:
        """Restores the newest readable round, moving damaged newer ones aside.

        Each damaged round is renamed to ``<round>.corrupt`` (kept for inspection, no
        longer listed), with a logged warning naming it and why it could not be read, so
        the resumed run saves its next rounds normally.

        Raises:
          FileNotFoundError: if there is no checkpoint.
          CorruptCheckpointError: if no round can be read (all of them are listed).
          ValueError: on a fingerprint or template mismatch (not a fallback case).
        """
        rounds = self.rounds()
        if not rounds:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        errors: dict[int, str] = {}
        for step in reversed(rounds):
            try:
                state = self.restore(template, step)
            except CorruptCheckpointError as e:
                errors[step] = str(e)
                continue
            if errors:
                self._quarantine(errors, step)
            return state
        raise CorruptCheckpointError(
            f"no readable checkpoint in {self.directory}: " + " | ".join(errors.values())
        )

    def _quarantine(self, errors: Mapping[int, str], resumed: int) -> None:
        if is_main_process():
            for step, error in errors.items():
                moved = quarantine(self.path(step))
                _log.warning("%s; moved it to %s, resuming from round %d", error, moved, resumed)
        sync("fedsp.checkpoint.quarantine")
        self._checkpointer.reload()

    def close(self) -> None:
        """Waits for pending Orbax work and releases its threads."""
        self._checkpointer.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
