"""TPAW's player pool: the last K global adapters, stored with Orbax.

TPAW (arXiv 2605.09922) trains the current policy against a team of historical
checkpoints, "players" = the last N_max = 3 iterates. In the federated setting the
global adapters after each round enter the pool. Only adapters are stored: a player is
the shared frozen base plus its LoRA state.

    pool = PlayerPool(workdir / "pool", max_players=3)
    pool.push(adapters, round=r, score=accuracy)          # after round r
    players, mask = pool.stacked(template)                 # [J, ...] and [J] bool
    graphdef, _, base = nnx.split(model, nnx.LoRAParam, ...)
    logits = jax.vmap(lambda a: nnx.merge(graphdef, a, base)(tokens))(players)  # [J, B, T, V]

Layout: ``<directory>/round_000012/`` holds one player (an Orbax checkpoint written by
`fedsp.checkpoint.run_state.save_tree`: atomic, via a temporary directory renamed on
completion) and ``<directory>/index.json`` lists the players in the pool. The pool
survives a restart: a new ``PlayerPool`` on the same directory reads the index (or, if
the index is lost, rebuilds it from the newest entries). For exact resume the index is
also part of the run state (`state_dict` / `from_state_dict`): restoring it removes
entries pushed after that run state was saved, so the resumed run pushes them again.

In a multi-host run every process holds the same pool and calls the same methods: Orbax
writes each entry with all of them, and only the main process changes other files (the
index, deletions, renames), the others waiting for it (`fedsp.distributed`). The
directory must be one every process sees (a shared file system or bucket).

``PlayerPool(None, ...)`` keeps the players in memory instead (a run without a work
directory writes no files); it has the same interface and holds the same values.

Files of the last ``keep_dropped`` players that left the pool by age stay on disk, so an
earlier run-state checkpoint (``RunCheckpointer(keep=k)``: use ``keep_dropped >= k``)
still finds all of its players. A damaged or missing entry raises
`CorruptCheckpointError` naming its round and path; with ``on_error="drop"`` it is
removed from the pool (renamed to ``round_N.corrupt``) with a warning and the other
players still load.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from fedsp.checkpoint.trees import (
    CorruptCheckpointError,
    load_meta,
    load_tree,
    quarantine,
    save_tree,
)
from fedsp.distributed import is_main_process, sync

PyTree = Any
OnError = Literal["raise", "drop"]

_INDEX = "index.json"
_ENTRY_RE = re.compile(r"round_(\d+)")


def _entry_name(round: int) -> str:  # `round` (shadowing the builtin) is the papers' word
    return f"round_{round:06d}"


@dataclasses.dataclass(frozen=True)
class PoolEntry:
    """One player: the round whose global adapters it holds, with its metadata."""

    round: int
    score: float | None
    metadata: Mapping[str, Any]
    path: epath.Path | None  # None in an in-memory pool


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "drop"):
        raise ValueError(f"on_error must be 'raise' or 'drop', got {on_error!r}")


def _zeros_like(leaf: Any) -> Any:
    """Zeros shaped like a template leaf (an array, a ShapeDtypeStruct or a scalar)."""
    return jnp.zeros(
        jnp.shape(leaf), leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
    )


@functools.partial(jax.jit, static_argnums=1)
def _stack_padded(trees: list[PyTree], num_slots: int) -> PyTree:
    """Stacks ``trees`` on a new leading axis of ``num_slots``, padding with zeros.

    Zero adapters (LoRA B = 0) make a padding slot the base model, so its log-probs stay
    finite before the mask removes them. One compiled program, not one per leaf shape.
    """
    pad = jax.tree.map(jnp.zeros_like, trees[0])
    trees = list(trees) + [pad] * (num_slots - len(trees))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class PlayerPool:
    """The last ``max_players`` global adapters, oldest first.

    Args:
      directory: where entries and the index live; created if missing. None keeps the
        players in memory (no files).
      max_players: K, the number of players (TPAW's N_max = 3).
      keep_dropped: how many players that left the pool by age keep their files, so an
        earlier run state can be resumed; set it ≥ the run checkpointer's ``keep``.
    """

    def __init__(
        self, directory: os.PathLike | str | None, max_players: int = 3, *, keep_dropped: int = 2
    ):
        self._max_players = _check_count("max_players", max_players, 1)
        self._keep_dropped = _check_count("keep_dropped", keep_dropped, 0)
        # round -> adapters, for a pool without a directory.
        self._memory: dict[int, PyTree] | None = None
        self._entries: list[PoolEntry] = []
        if directory is None:
            self._memory = {}
            return
        self._directory = epath.Path(directory)
        if is_main_process():
            self._directory.mkdir(parents=True, exist_ok=True)
            for path in self._directory.iterdir():
                # Leftovers of a push that crashed before Orbax's final rename.
                if _ENTRY_RE.match(path.name) and ".orbax-checkpoint-tmp" in path.name:
                    path.rmtree()
        sync("fedsp.pool.open")
        entries = self._read_index()
        if entries is None:
            entries = self._scan()
            self._entries = entries[-self._max_players :]
            self._write_index()
        else:
            self._entries = entries[-self._max_players :]
        sync("fedsp.pool.opened")

    # ------------------------------------------------------------------ inspection

    @property
    def directory(self) -> epath.Path | None:
        """The pool's directory; None for an in-memory pool."""
        return None if self._memory is not None else self._directory

    @property
    def max_players(self) -> int:
        return self._max_players

    @property
    def entries(self) -> tuple[PoolEntry, ...]:
        """The players, oldest first."""
        return tuple(self._entries)

    @property
    def rounds(self) -> tuple[int, ...]:
        """The rounds of the players, oldest first."""
        return tuple(e.round for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        where = None if self.directory is None else str(self.directory)
        return f"PlayerPool({where!r}, max_players={self._max_players}, rounds={list(self.rounds)})"

    # ------------------------------------------------------------------ index I/O

    def _path(self, round: int) -> epath.Path | None:
        return None if self._memory is not None else self._directory / _entry_name(round)

    def _entry(self, round: int, score: Any, metadata: Any) -> PoolEntry:
        return PoolEntry(
            round=int(round),
            score=None if score is None else float(score),
            metadata=dict(metadata or {}),
            path=self._path(int(round)),
        )

    def _entry_dirs(self) -> dict[int, epath.Path]:
        dirs = {}
        for path in self._directory.iterdir():
            match = _ENTRY_RE.fullmatch(path.name)
            if match and path.is_dir():
                dirs[int(match.group(1))] = path
        return dirs

    def _read_index(self) -> list[PoolEntry] | None:
        path = self._directory / _INDEX
        if not path.exists():
            return None
        try:
            index = json.loads(path.read_text())
            return [
                self._entry(e["round"], e.get("score"), e.get("metadata")) for e in index["entries"]
            ]
        except (ValueError, KeyError, TypeError) as e:
            warnings.warn(
                f"player pool index {path} is unreadable ({e}); rebuilding it from the entries",
                stacklevel=3,
            )
            return None

    def _scan(self) -> list[PoolEntry]:
        """Rebuilds the index from the newest readable entries on disk."""
        entries: list[PoolEntry] = []
        for round_, path in sorted(self._entry_dirs().items(), reverse=True):
            if len(entries) == self._max_players:
                break
            try:
                meta = load_meta(path)
            except CorruptCheckpointError as e:
                warnings.warn(f"skipping player pool entry for round {round_}: {e}", stacklevel=3)
                continue
            entries.append(self._entry(round_, meta.get("score"), meta.get("metadata")))
        return entries[::-1]

    def _write_index(self) -> None:
        if self._memory is not None or not is_main_process():
            return
        path = self._directory / _INDEX
        tmp = self._directory / f"{_INDEX}.tmp"
        tmp.write_text(json.dumps(self.state_dict(), indent=1))
        tmp.replace(path)  # atomic on POSIX: readers see the old or the new index

    def _collect_garbage(self) -> None:
        """Deletes entry files that neither the pool nor a recent run state needs."""
        if not is_main_process():
            return
        in_pool = set(self.rounds)
        newest = max(in_pool, default=-1)
        dropped = 0
        for round_, path in sorted(self._entry_dirs().items(), reverse=True):
            if round_ in in_pool:
                continue
            if round_ < newest and dropped < self._keep_dropped:
                dropped += 1
                continue
            path.rmtree()

    # ------------------------------------------------------------------ mutation

    def push(
        self,
        adapters: PyTree,
        round: int,
        score: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PoolEntry:
        """Saves ``adapters`` as the newest player; the oldest leaves beyond ``max_players``.

        Args:
          adapters: the global adapters after round ``round`` (``nnx.State`` or pytree).
          round: the round (or self-play iteration); must exceed every player's round.
          score: an optional scalar (e.g. evaluation accuracy).
          metadata: optional JSON-serializable dict stored with the player.

        Returns:
          The new entry.

        Raises:
          ValueError: on a non-increasing round, a score that is not a real number, or
            metadata that is not a JSON-serializable dict.
        """
        round_ = _check_count("round", round, 0)
        if self._entries and round_ <= self._entries[-1].round:
            raise ValueError(
                f"round must exceed the newest player's round {self._entries[-1].round}, got "
                f"{round_}; to resume from an earlier run state, restore the pool with "
                "PlayerPool.from_state_dict"
            )
        if score is not None:
            try:
                score = float(score)
            except (TypeError, ValueError) as e:
                raise ValueError(f"score must be a real number or None, got {score!r}") from e
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        entry = self._entry(round_, score, metadata)
        if self._memory is not None:
            self._memory[round_] = jax.tree.map(lambda x: x, adapters)
            self._entries = [*self._entries, entry][-self._max_players :]
            keep = set(sorted(self._memory)[-(self._max_players + self._keep_dropped) :])
            self._memory = {r: a for r, a in self._memory.items() if r in keep}
            return entry
        if is_main_process():
            for stale_round, path in self._entry_dirs().items():
                # Written by a push whose round was never committed to the index.
                if stale_round >= round_:
                    path.rmtree()
        sync(f"fedsp.pool.push.{round_}")
        assert entry.path is not None  # a pool with a directory gives every entry a path
        try:
            save_tree(
                entry.path,
                adapters,
                meta={"round": entry.round, "score": entry.score, "metadata": entry.metadata},
            )
        except ValueError as e:
            raise ValueError(f"cannot push round {round_}: {e}") from e
        self._entries = [*self._entries, entry][-self._max_players :]
        self._write_index()
        self._collect_garbage()
        sync(f"fedsp.pool.pushed.{round_}")
        return entry

    def drop(self, round: int) -> None:
        """Removes round ``round``'s player; its files (if any) move to ``round_N.corrupt``."""
        if round not in self.rounds:
            raise ValueError(
                f"round must be one of the players' rounds {list(self.rounds)}, got {round!r}"
            )
        path = self._path(round)
        if self._memory is not None:
            self._memory.pop(round, None)
        elif path is not None and path.exists() and is_main_process():
            quarantine(path)
        self._entries = [e for e in self._entries if e.round != round]
        self._write_index()
        if self._memory is None:
            sync(f"fedsp.pool.drop.{round}")

    # ------------------------------------------------------------------ loading

    def load(self, i: int, template: PyTree) -> PyTree:
        """Loads player ``i`` (0 = oldest, -1 = newest) into the structure of ``template``.

        Args:
          i: the player's position in `entries`.
          template: the adapters' structure (e.g. ``nnx.state(model, nnx.LoRAParam)`` or
            its ``jax.eval_shape``); values are not read.

        Returns:
          The player's adapters, with the template's structure, dtypes and shardings. Put
          them on the shared base with `with_adapters` (or ``nnx.merge``).

        Raises:
          CorruptCheckpointError: naming the entry's round and path, if it is missing or
            cannot be read.
          ValueError: if ``i`` is out of range or ``template`` does not match.
        """
        n = len(self._entries)
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -n <= i < n:
            raise ValueError(
                f"i must be an int in [{-n}, {n}) for a pool of {n} player(s), got {i!r}"
            )
        entry = self._entries[i]
        if self._memory is not None:
            if entry.round not in self._memory:
                raise CorruptCheckpointError(
                    f"player pool entry for round {entry.round}: not in this in-memory pool"
                )
            return self._memory[entry.round]
        try:
            adapters, _ = load_tree(entry.path, template)
        except CorruptCheckpointError as e:
            raise CorruptCheckpointError(f"player pool entry for round {entry.round}: {e}") from e
        return adapters

    def players(self, template: PyTree, *, on_error: OnError = "raise") -> list[PyTree]:
        """Loads every player, oldest first.

        Args:
          template: the adapters' structure (see `load`).
          on_error: "raise" stops at a damaged/missing entry; "drop" removes it from the
            pool with a warning and loads the others.
        """
        _check_on_error(on_error)
        loaded = []
        for entry in list(self._entries):
            try:
                loaded.append(self.load(self.rounds.index(entry.round), template))
            except CorruptCheckpointError as e:
                if on_error == "raise":
                    raise
                self.drop(entry.round)
                warnings.warn(f"dropped from the player pool: {e}", stacklevel=2)
        return loaded

    def stacked(self, template: PyTree, *, on_error: OnError = "raise") -> tuple[PyTree, jax.Array]:
        """The players stacked on a leading axis J = ``max_players``, for a vmap over J.

        Returns:
          ``(players, mask)``: ``players`` has the template's structure with every leaf
          [J, ...]: slot j < len(pool) holds player j (oldest first) and the remaining
          slots hold zeros; ``mask`` is [J] bool, True for real players (TPAW's
          ``player_mask``). A fixed J keeps jitted callers from recompiling while the
          pool fills up.
        """
        trees = self.players(template, on_error=on_error)
        n = len(trees)
        if not trees:
            trees = [jax.tree.map(_zeros_like, template)]
        stacked = _stack_padded(trees, self._max_players)
        return stacked, jnp.asarray(np.arange(self._max_players) < n)

    # ------------------------------------------------------------------ run state

    def state_dict(self) -> dict[str, Any]:
        """The pool index as JSON: store it in the run state (`RoundState.pool`)."""
        return {
            "max_players": self._max_players,
            "entries": [
                {"round": e.round, "score": e.score, "metadata": dict(e.metadata)}
                for e in self._entries
            ],
        }

    @classmethod
    def from_state_dict(
        cls, directory: os.PathLike | str, state: Mapping[str, Any], *, keep_dropped: int = 2
    ) -> PlayerPool:
        """Reopens the pool exactly as `state_dict` recorded it.

        Entries on disk newer than the recorded players were pushed after that run state
        was saved; they are deleted (the resumed run pushes them again). A recorded
        player whose files are gone is kept in the index and raises when loaded.

        Raises:
          ValueError: if ``state`` is not a `state_dict` (named fields missing).
        """
        if not isinstance(state, Mapping) or "max_players" not in state or "entries" not in state:
            raise ValueError(
                "state must be a PlayerPool.state_dict() with 'max_players' and 'entries', "
                f"got {state!r}"
            )
        if directory is None:
            raise ValueError(
                "an in-memory pool holds its players only while it lives; "
                "restoring one from a state dict needs its directory"
            )
        pool = cls(directory, state["max_players"], keep_dropped=keep_dropped)
        try:
            entries = [
                pool._entry(e["round"], e.get("score"), e.get("metadata")) for e in state["entries"]
            ]
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"state['entries'] must be a list of {{'round', 'score', 'metadata'}} dicts: {e}"
            ) from e
        pool._entries = entries[-pool._max_players :]
        newest = max(pool.rounds, default=-1)
        if is_main_process():
            for round_, path in pool._entry_dirs().items():
                if round_ > newest:
                    path.rmtree()
        pool._write_index()
        sync("fedsp.pool.restored")
        return pool


def with_adapters(
    model: nnx.Module,
    adapters: PyTree,
    filter: Any = nnx.LoRAParam,  # `filter` (shadowing the builtin) is nnx's own name for it
) -> nnx.Module:
    """A new module: ``model``'s frozen base with ``adapters`` in place of its own.

    The base arrays are shared, not copied (``nnx.merge`` wraps the same immutable jax
    arrays), and ``model`` is left unchanged.

    Args:
      model: the model whose non-``filter`` state (the frozen base) is reused.
      adapters: an ``nnx.State`` of the ``filter`` variables, or its pure dict.
      filter: which variables are the adapters (default ``nnx.LoRAParam``).

    Raises:
      ValueError: if ``adapters`` does not have the shapes of ``model``'s adapters.
    """
    # flax types split() with two filters as (GraphDef, State, *States): two states here.
    graphdef, current, base = nnx.split(model, filter, ...)  # type: ignore[misc]
    if not isinstance(adapters, nnx.State):
        pure = adapters
        adapters = jax.tree.map(lambda v: v, current)
        nnx.replace_by_pure_dict(adapters, pure)
    want = jax.tree.map(jnp.shape, nnx.to_pure_dict(current))
    got = jax.tree.map(jnp.shape, nnx.to_pure_dict(adapters))
    if want != got:
        raise ValueError(f"adapters must have the model's adapter shapes {want}, got {got}")
    return nnx.merge(graphdef, adapters, base)
