"""Progress of the work inside a round, for whoever shows it.

The library's long loops (rollout generation, evaluation) call `report` after each
batch; nothing happens unless a listener is installed with `listening`. `fedsp.run`
installs one that writes the phase and count beside its progress bar; a notebook can
install its own:

    from fedsp import progress

    with progress.listening(lambda phase, done, total: print(phase, done, total)):
        state, record = fedsp.run_round(state)

Only the main thread's calls are passed on, and a listener's exception propagates (a
listener is code the caller wrote).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

__all__ = ["Listener", "listening", "report"]

Listener = Callable[[str, int, int], None]
"""``listener(phase, done, total)``: ``done`` of ``total`` items of ``phase`` finished."""

_LISTENERS: list[Listener] = []


def report(phase: str, done: int, total: int) -> None:
    """Tells the installed listeners that ``done`` of ``total`` items of ``phase`` are
    finished (``phase`` names the items, e.g. ``"rollout rows"``)."""
    if not _LISTENERS or threading.current_thread() is not threading.main_thread():
        return
    for listener in tuple(_LISTENERS):
        listener(phase, done, total)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Installs ``listener`` for the duration of the ``with`` block."""
    _LISTENERS.append(listener)
    try:
        yield
    finally:
        _LISTENERS.remove(listener)
