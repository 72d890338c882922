"""Each client's opponent data across rounds, client side: the (x, y⁺, y⁻) pairs of its
last rounds as token ids (SPIN trains on D_t ∪ D_{t−1}, TPAW on D_t ∪ D_{t−1} ∪ D_{t−2}).

The round loop saves `OpponentHistory.state_dict` beside each run checkpoint
(`fedsp.checkpoint.save_client_state`), never on the server, and restores it on resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (x, y⁺, y⁻) of a client, host side: token ids, never text."""

    prompt: np.ndarray
    pos: np.ndarray
    neg: np.ndarray


class OpponentHistory:
    """Each client's pairs of its last ``rounds_kept`` rounds, keyed by global client id.

    ``state_dict`` / ``load_state_dict`` turn it into flat numpy arrays (for
    `fedsp.checkpoint.save_client_state`) and back.
    """

    def __init__(self, rounds_kept: int):
        if rounds_kept < 0:
            raise ValueError(f"rounds_kept must be >= 0, got {rounds_kept}")
        self.rounds_kept = rounds_kept
        self._data: dict[int, list[tuple[int, list[Pair]]]] = {}

    def past(self, client: int, before_round: int) -> list[Pair]:
        """The client's kept pairs of rounds before ``before_round``, newest round first."""
        rounds = [(r, p) for r, p in self._data.get(int(client), []) if r < before_round]
        return [pair for _, pairs in sorted(rounds, key=lambda x: -x[0]) for pair in pairs]

    def record(self, client: int, round: int, pairs: Sequence[Pair]) -> None:
        """Keeps ``pairs`` as the client's data of ``round`` (replacing an earlier record
        of the same round), dropping rounds beyond ``rounds_kept``."""
        if self.rounds_kept == 0:
            return
        kept = [(r, p) for r, p in self._data.get(int(client), []) if r != round]
        kept = sorted([*kept, (int(round), list(pairs))], key=lambda x: x[0])
        self._data[int(client)] = kept[-self.rounds_kept :]

    def num_pairs(self) -> int:
        return sum(len(p) for rounds in self._data.values() for _, p in rounds)

    def state_dict(self) -> dict[str, np.ndarray]:
        clients, rounds, lengths, tokens = [], [], [], []
        for client in sorted(self._data):
            for round_, pairs in self._data[client]:
                for pair in pairs:
                    clients.append(client)
                    rounds.append(round_)
                    lengths.append([len(pair.prompt), len(pair.pos), len(pair.neg)])
                    tokens.extend([pair.prompt, pair.pos, pair.neg])
        return {
            "client": np.asarray(clients, np.int64),
            "round": np.asarray(rounds, np.int64),
            "lengths": np.asarray(lengths, np.int64).reshape(-1, 3),
            "tokens": (
                np.concatenate(tokens).astype(np.int32) if tokens else np.zeros((0,), np.int32)
            ),
        }

    def load_state_dict(self, arrays: Mapping[str, np.ndarray]) -> None:
        missing = [k for k in ("client", "round", "lengths", "tokens") if k not in arrays]
        if missing:
            raise ValueError(f"opponent history arrays lack {missing}; got {sorted(arrays)}")
        lengths = np.asarray(arrays["lengths"]).reshape(-1, 3)
        tokens = np.asarray(arrays["tokens"], np.int32)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(
                f"opponent history: lengths sum to {int(lengths.sum())} but "
                f"tokens holds {tokens.size}"
            )
        data: dict[int, dict[int, list[Pair]]] = {}
        offset = 0
        for client, round_, (n_p, n_pos, n_neg) in zip(arrays["client"], arrays["round"], lengths):
            cut = np.cumsum([offset, n_p, n_pos, n_neg])
            pair = Pair(tokens[cut[0] : cut[1]], tokens[cut[1] : cut[2]], tokens[cut[2] : cut[3]])
            data.setdefault(int(client), {}).setdefault(int(round_), []).append(pair)
            offset = int(cut[3])
        self._data = {
            c: sorted(rounds.items())[-self.rounds_kept :] if self.rounds_kept else []
            for c, rounds in data.items()
        }
