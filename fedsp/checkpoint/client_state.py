"""Client-side state that outlives a round, stored beside the run checkpoints.

Some client algorithms keep host data across rounds that must survive a restart but
must never reach the server: SPIN and TPAW train on their opponent data of earlier
rounds (prompt, gold and generated token ids). The round loop saves such an algorithm's
``client_state()`` (a flat dict of numpy arrays) for every round it checkpoints, into
``<directory>/round_<r>.npz``, and on resume loads the file of the round it restored.
The file lives in the client-side part of the run directory: the server step never
receives it.

Writes are atomic (a temporary file renamed into place), so a crash mid-save leaves the
previous files intact. A missing or unreadable file raises `CorruptCheckpointError`
naming it.
"""

from __future__ import annotations

import os
import pathlib
import re
import zipfile
from collections.abc import Iterable, Mapping

import numpy as np

from fedsp.checkpoint.trees import CorruptCheckpointError

__all__ = ["client_state_path", "load_client_state", "prune_client_state", "save_client_state"]

_NAME_RE = re.compile(r"round_(\d+)\.npz")


def client_state_path(directory: os.PathLike | str, round: int) -> pathlib.Path:
    """``<directory>/round_<round:06d>.npz``."""
    return pathlib.Path(directory) / f"round_{int(round):06d}.npz"


def save_client_state(
    directory: os.PathLike | str,
    round: int,
    arrays: Mapping[str, np.ndarray],
) -> pathlib.Path:
    """Writes ``arrays`` as round ``round``'s client state (replacing an older file).

    Raises:
      ValueError: if a key is not a str or a value is not an array of numbers/bools.
    """
    for key, value in arrays.items():
        if not isinstance(key, str):
            raise ValueError(f"client state keys must be str, got {key!r}")
        kind = np.asarray(value).dtype.kind
        if kind not in "biuf":
            raise ValueError(
                f"client state {key!r} must be a numeric or bool array (token ids, counts), "
                f"got dtype {np.asarray(value).dtype}"
            )
    path = client_state_path(directory, round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # numpy's stub: keyword arrays could bind savez's allow_pickle flag (a key named
        # "allow_pickle" would), so a str-keyed dict is not accepted.
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    return path


def load_client_state(directory: os.PathLike | str, round: int) -> dict[str, np.ndarray]:
    """Round ``round``'s client state.

    Raises:
      CorruptCheckpointError: naming the file, if it is missing or unreadable.
    """
    path = client_state_path(directory, round)
    if not path.is_file():
        raise CorruptCheckpointError(f"client state of round {round} is missing: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CorruptCheckpointError(
            f"client state of round {round} at {path} is corrupt: {type(e).__name__}: {e}"
        ) from e


def prune_client_state(directory: os.PathLike | str, keep_rounds: Iterable[int]) -> None:
    """Deletes the client-state files of rounds outside ``keep_rounds`` (the rounds that
    still have a run checkpoint), and leftovers of an interrupted save."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return
    keep = {int(r) for r in keep_rounds}
    for path in directory.iterdir():
        match = _NAME_RE.fullmatch(path.name)
        if (match and int(match.group(1)) not in keep) or path.name.endswith(".npz.tmp"):
            path.unlink()
