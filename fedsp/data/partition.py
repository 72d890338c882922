"""Splitting a dataset across federated clients, and sampling clients per round.

Every function returns integer index arrays into the example list (each sorted), so the
same partition applies to any per-example data. All randomness comes from explicit
seeds: the same arguments give the same result in every process.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

__all__ = [
    "CLIENT_SAMPLINGS",
    "dirichlet_partition",
    "iid_partition",
    "key_partition",
    "sample_clients",
]

CLIENT_SAMPLINGS = ("fixed", "poisson")
# The Poisson draws' seed entries, apart from the fixed sampling's (seed, round).
_POISSON_STREAM = 0x504F


class _Label(Hashable, Protocol):
    """A `key_partition` label: hashable and ordered (e.g. a str)."""

    def __lt__(self, other: Any, /) -> bool: ...


_LabelT = TypeVar("_LabelT", bound=_Label)


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A uniform random split of ``range(n)`` into ``num_clients`` near-equal parts.

    Returns:
      ``num_clients`` sorted int64 arrays, disjoint, covering ``range(n)``; sizes differ
      by at most one.

    Raises:
      ValueError: ``num_clients`` < 1 or > ``n`` (a client would get no example).
    """
    _check_num_clients(num_clients, n, min_size=1)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed non-IID split (Hsu et al. 2019, arXiv 1909.06335).

    For each label k, client proportions q_k ~ Dirichlet(α·1_C) are drawn and the
    (shuffled) examples of label k are cut among the C clients in those proportions.
    Small α gives each client few labels; large α approaches the IID split.

    A draw in which some client gets fewer than ``min_size`` examples is redrawn, up to
    ``max_retries`` times; if every draw falls short (very small α, many clients), the
    last one is repaired by moving random examples from the currently largest client to
    each short one, so the guarantee always holds.

    Args:
      labels: one label per example (e.g. `Example.label`), compared as strings.
      num_clients: C.
      alpha: the Dirichlet concentration α > 0.
      seed: the seed for proportions, shuffles and repairs.
      min_size: the fewest examples any client may get (>= 0).
      max_retries: redraws before repairing.

    Returns:
      C sorted int64 arrays, disjoint, covering ``range(len(labels))``.

    Raises:
      ValueError: empty ``labels``; ``alpha`` not a finite positive number; ``num_clients`` < 1 or
        ``num_clients * min_size > len(labels)``; ``min_size`` < 0; ``max_retries`` < 1.
    """
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    if not isinstance(max_retries, (int, np.integer)) or max_retries < 1:
        raise ValueError(f"max_retries must be an integer >= 1, got {max_retries!r}")
    n = len(labels)
    if n == 0:
        raise ValueError("labels is empty: dirichlet_partition needs at least one example")
    _check_num_clients(num_clients, n, min_size)
    _, label_ids = np.unique(
        np.asarray([str(label) for label in labels], dtype=object), return_inverse=True
    )
    rng = np.random.default_rng(seed)
    for _ in range(max_retries):
        parts = _dirichlet_draw(label_ids, num_clients, float(alpha), rng)
        if min(len(part) for part in parts) >= min_size:
            return [np.sort(part).astype(np.int64) for part in parts]
    return [np.sort(part).astype(np.int64) for part in _top_up(parts, min_size, rng)]


def key_partition(labels: Sequence[_LabelT]) -> dict[_LabelT, np.ndarray]:
    """One client per distinct label (e.g. one client per subject).

    Returns:
      ``{label: sorted int64 indices}`` in sorted label order (labels must be mutually
      comparable, e.g. all str); ``list(result.values())`` is the client list.

    Raises:
      ValueError: ``labels`` is empty.
    """
    if len(labels) == 0:
        raise ValueError("labels is empty: key_partition needs at least one example")
    groups: dict[_LabelT, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    return {key: np.asarray(groups[key], dtype=np.int64) for key in sorted(groups)}


def sample_clients(
    num_clients: int, per_round: int, seed: int, round: int, sampling: str = "fixed"
) -> np.ndarray:
    """The clients taking part in round ``round``, as sorted distinct ids.

    ``sampling="fixed"``: ``per_round`` distinct clients, drawn without replacement.
    ``"poisson"``: every client takes part independently with probability
    q = ``per_round`` / ``num_clients``, so a round has ``per_round`` clients on average,
    any number from none to all of them (the sampling DP-FedAvg's add-or-remove-one
    accounting assumes, `fedsp.core.privacy`).

    A function of ``(seed, round)`` alone (a `numpy.random.SeedSequence` over both), so a
    run resumed at round r draws the same clients as an uninterrupted one, and rounds are
    independent of each other.

    Raises:
      ValueError: ``num_clients`` < 1; ``clients_per_round`` (``per_round``) outside
        1..num_clients; negative ``seed`` or ``round``; an unknown ``sampling``.
    """
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if not isinstance(per_round, (int, np.integer)) or not 1 <= per_round <= num_clients:
        raise ValueError(
            f"clients_per_round must be an integer in 1..num_clients={num_clients}, "
            f"got {per_round!r}"
        )
    if seed < 0 or round < 0:
        raise ValueError(f"seed and round must be >= 0, got seed={seed!r}, round={round!r}")
    if sampling == "poisson":
        rng = np.random.default_rng([int(seed), int(round), _POISSON_STREAM, _POISSON_STREAM])
        return np.flatnonzero(rng.random(num_clients) < per_round / num_clients).astype(np.int64)
    if sampling != "fixed":
        raise ValueError(f"sampling must be one of {CLIENT_SAMPLINGS}, got {sampling!r}")
    rng = np.random.default_rng([int(seed), int(round)])
    return np.sort(rng.choice(num_clients, size=per_round, replace=False)).astype(np.int64)


def _dirichlet_draw(
    label_ids: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(int(label_ids.max()) + 1):
        members = rng.permutation(np.flatnonzero(label_ids == k))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            chunks[client].append(chunk)
    return [np.concatenate(c) for c in chunks]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Moves random examples from the largest client to short ones until all reach ``min_size``.

    Terminates because the caller checked ``num_clients * min_size <= n``: while a client
    is short, the largest has more than ``min_size``.
    """
    members = [list(part) for part in parts]
    for client in range(len(members)):
        while len(members[client]) < min_size:
            donor = max(range(len(members)), key=lambda c: len(members[c]))
            members[client].append(members[donor].pop(int(rng.integers(len(members[donor])))))
    return [np.asarray(part, dtype=np.int64) for part in members]


def _check_num_clients(num_clients: int, n: int, min_size: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients * min_size > n:
        raise ValueError(
            f"num_clients={num_clients} clients with at least {min_size} example(s) each need "
            f"{num_clients * min_size} examples, but there are only {n}"
        )
