"""Where benchmark records come from: a local data directory, or the Hugging Face hub.

Local files live under a data directory given by the ``data_dir`` argument, else by the
``FEDSP_DATA_DIR`` environment variable; they are never copied into the repository.
When a split has no local file and ``source`` allows it, the same benchmark is read from
the Hugging Face hub through `datasets` (an optional extra: ``pip install 'fedsp[data]'``),
imported lazily so that the rest of fedsp never needs it.

Records are returned as plain dicts in each benchmark's local file schema; the tasks turn
them into `Example` objects.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

__all__ = [
    "DATA_DIR_ENV",
    "SOURCES",
    "DataNotFoundError",
    "hub_dataset",
    "hub_file",
    "load_records",
    "read_json",
    "read_jsonl",
    "resolve_data_dir",
]

DATA_DIR_ENV = "FEDSP_DATA_DIR"
SOURCES = ("auto", "local", "hub")

_log = logging.getLogger(__name__)


class DataNotFoundError(FileNotFoundError):
    """A benchmark split is neither on disk nor obtainable from the hub."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> pathlib.Path | None:
    """``data_dir`` if given, else ``$FEDSP_DATA_DIR``, else None (no local data)."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return None if data_dir is None else pathlib.Path(data_dir).expanduser()


def read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: pathlib.Path) -> Any:
    """A whole-file JSON document."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def hub_dataset(path: str, name: str | None, split: str) -> list[dict[str, Any]]:
    """All records of a hub dataset split, via ``datasets.load_dataset``."""
    datasets = _import_datasets()
    return [dict(record) for record in datasets.load_dataset(path, name, split=split)]


def hub_file(url: str) -> pathlib.Path:
    """A file downloaded (and cached) by `datasets`' download manager."""
    datasets = _import_datasets()
    return pathlib.Path(datasets.DownloadManager().download(url))


def load_records(
    *,
    dataset: str,
    split: str,
    relpath: str | None,
    read_local: Callable[[pathlib.Path], list[dict[str, Any]]],
    hub: Callable[[], list[dict[str, Any]]],
    hub_name: str,
    data_dir: str | os.PathLike[str] | None,
    source: str,
) -> tuple[list[dict[str, Any]], str]:
    """Records of one split, and a description of where they came from.

    Args:
      dataset: the task name, for messages.
      split: the split name, for messages.
      relpath: the split's file relative to the data directory (None: no local file).
      read_local: parses that file into records.
      hub: reads the split from the hub.
      hub_name: the hub dataset the messages point users to.
      data_dir: explicit data directory, else ``$FEDSP_DATA_DIR``.
      source: "auto" (local file if present, else hub), "local" or "hub".

    Raises:
      ValueError: ``source`` is not one of `SOURCES`.
      DataNotFoundError: no local file (or ``source="hub"``) and the hub cannot be used;
        the message names the path, the ``data_dir``/``FEDSP_DATA_DIR`` setting and the
        online alternative.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    root = resolve_data_dir(data_dir)
    path = root / relpath if root is not None and relpath is not None else None
    if source != "hub" and path is not None and path.is_file():
        return read_local(path), str(path)

    if source == "hub":
        where = "source='hub' does not read local files"
    elif root is None:
        where = f"no data directory is set (data_dir=None and ${DATA_DIR_ENV} is unset)"
    elif relpath is None:
        where = f"there is no local file for this split in the data directory {root}"
    elif not root.is_dir():
        where = f"the data directory {root} does not exist"
    else:
        where = f"{path} does not exist"
    setting = (
        f"set data_dir= or ${DATA_DIR_ENV} to the benchmark folder (e.g. ../shared/data, "
        f"expected file <data_dir>/{relpath})"
        if relpath
        else ""
    )
    online = (
        f"online alternative: pip install 'fedsp[data]' and use source='auto' or 'hub' "
        f"to read {hub_name} from the Hugging Face hub"
    )
    message = f"{dataset} split {split!r}: {where}; " + "; ".join(p for p in (setting, online) if p)
    if source == "local":
        raise DataNotFoundError(message)
    if source == "auto":
        _log.warning("%s; reading %s from the Hugging Face hub", message.split("; ")[0], hub_name)
    try:
        return hub(), f"hub:{hub_name}:{split}"
    except Exception as err:  # ImportError, network, auth: report what was tried locally too.
        raise DataNotFoundError(f"{message}. Hub load failed: {type(err).__name__}: {err}") from err


def _import_datasets() -> Any:
    try:
        import datasets  # optional extra, imported on use
    except ImportError as err:
        raise ImportError(
            "reading benchmarks from the Hugging Face hub needs the `datasets` "
            "package: pip install 'fedsp[data]'"
        ) from err
    return datasets
