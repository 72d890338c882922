"""A federation node: one client's data and model, answering the server's messages.

A node is the client its node config's ``partition-id`` names. It reads the training
split and keeps only its own shard (the partition the simulator gives that client; the
other clients' examples are dropped), loads the base model once per process, and for each ``train`` message runs the configured
algorithm's rollout, feedback and local training from the received adapters
(`fedsp.federated.client_updates` for this one client, at the position the server says
it has among the round's sampled clients, so it draws what the simulator draws for it).

Messages (``message_type``), all from the server:

  query.identify  → ``{"node": MetricRecord(client=…)}``: which client this node is;
  train           ``params`` (θ_r), ``round`` (ConfigRecord: round, client, slot,
                  baseline, upload, fingerprint) and, for a player pool, ``players`` and
                  ``pool`` → ``stats``, ``collect`` and ``time`` (MetricRecords) and, when
                  ``upload`` is 1, ``adapters`` (none from a client that trained on
                  nothing: its weight is 0); otherwise the adapters wait in the
                  node's context until
  train.upload    → ``adapters``: the held update, sent only to clients the server keeps
                  (a pruned client's adapters never leave the node).

Every reply passes `fedsp.flower.records.check_reply` before it leaves: arrays and
numbers under fixed keys, never text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsp.federated import RunState, client_updates
from fedsp.flower import records, settings
from fedsp.runner import init_run
from fedsp.selfplay.base import RoundContext

__all__ = ["Node", "handle", "load_node", "own_shard"]

PyTree = Any
_PENDING = "fedsp.pending"
_PENDING_ROUND = "fedsp.pending_round"


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """One client's side of a federation.

    Attributes:
      client: the client id (node config ``partition-id``).
      state: the run as this node sees it (`fedsp.init_run` of the shared config):
        model, task, its data, the algorithm and the mapped local training.
      fingerprint: the config's fingerprint (`fedsp.flower.settings.fingerprint`).
    """

    client: int
    state: RunState
    fingerprint: dict[str, Any]

    def train(self, content: RecordDict) -> tuple[RecordDict, ArrayRecord | None]:
        """Answers a ``train`` message: (reply, adapters held back when not uploaded)."""
        spec = content["round"]
        if not isinstance(spec, ConfigRecord):
            raise ValueError("train message: 'round' must be a ConfigRecord")
        client, rnd, slot = (int(records.scalar(spec, k)) for k in ("client", "round", "slot"))
        if client != self.client:
            raise ValueError(f"train message for client {client} reached client {self.client}")
        theirs = json.loads(str(spec["fingerprint"]))
        differ = sorted(
            k
            for k in set(theirs) | set(self.fingerprint)
            if theirs.get(k) != self.fingerprint.get(k)
        )
        if differ:
            raise ValueError(
                f"client {self.client}'s config differs from the server's in {differ[:10]}; "
                "start the node with the server's config and overrides"
            )
        run, like = self.state.run, self.state.params
        assert run is not None
        params = records.record_to_tree(_array_record(content, "params"), like, name="params")
        params = jax.tree.map(lambda ref, x: jax.device_put(x, ref.sharding), like, params)
        context = None
        if getattr(run.algorithm, "uses_context", False):
            context = self._context(content, run.initial_params, like)
        uploads, collect, times = client_updates(
            run,
            params,
            self.state.rng,
            rnd,
            [client],
            np.asarray([records.scalar(spec, "baseline")], np.float32),
            slots=[slot],
            context=context,
        )
        adapters = jax.tree.map(lambda x: np.asarray(x)[0], uploads.params)
        finite = all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(adapters))
        stats = {k: np.asarray(v)[0] for k, v in uploads.stats.items()}
        reply = RecordDict(
            {
                "stats": records.metrics_record({**stats, "finite": float(finite)}),
                "collect": records.metrics_record(collect),
                "time": records.metrics_record(times),
            }
        )
        if not stats["num_examples"] > 0:
            # Trained on nothing: weight 0 in every weighting, so nothing to send.
            return reply, None
        update = records.tree_to_record(adapters)
        if records.scalar(spec, "upload"):
            reply["adapters"] = update
            return reply, None
        return reply, update

    def _context(self, content: RecordDict, reference: PyTree, like: PyTree) -> RoundContext:
        players = player_mask = None
        rounds: tuple[int, ...] = ()
        if "players" in content:
            pool = content["pool"]
            if not isinstance(pool, ConfigRecord):
                raise ValueError("train message: 'pool' must be a ConfigRecord")
            player_mask = np.asarray(pool["player_mask"], bool)
            rounds = tuple(int(r) for r in pool["player_rounds"])  # type: ignore[union-attr]
            stacked_like = jax.tree.map(
                lambda x: np.zeros((len(player_mask), *x.shape), x.dtype), like
            )
            players = records.record_to_tree(
                _array_record(content, "players"), stacked_like, name="players"
            )
        return RoundContext(
            clients=np.asarray([self.client]),
            reference=reference,
            players=players,
            player_mask=None if player_mask is None else jax.numpy.asarray(player_mask),
            player_rounds=rounds,
        )


def _array_record(content: RecordDict, name: str) -> ArrayRecord:
    record = content.get(name)
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"message lacks the ArrayRecord {name!r}")
    return record


@functools.cache
def _load(config_path: str, overrides: str, node_items: tuple[tuple[str, Any], ...]) -> Node:
    node_config = dict(node_items)
    config = settings.load_config(config_path, overrides)
    settings.node_config_overrides(config, node_config)
    client = settings.node_client(config, node_config)
    state = init_run(config)
    return Node(
        client=client, state=own_shard(state, client), fingerprint=settings.fingerprint(config)
    )


def own_shard(state: RunState, client: int) -> RunState:
    """``state`` whose run keeps only ``client``'s training examples (in shard order, so
    `fedsp.federated.client_prompts` picks the same examples); the rest are dropped."""
    run = state.run
    assert run is not None
    shard = run.shards[client]
    shards = [np.zeros(0, np.int64)] * len(run.shards)
    shards[client] = np.arange(len(shard))
    own = dataclasses.replace(run, train=[run.train[i] for i in shard], shards=shards)
    return dataclasses.replace(state, run=own)


def load_node(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> Node:
    """This process's `Node` for a run (built once per process and configuration)."""
    return _load(
        str(run_config["config"]),
        str(run_config.get("overrides", "")),
        tuple(sorted((str(k), v) for k, v in node_config.items())),
    )


def handle(
    message: Message,
    run_config: Mapping[str, Any],
    node_config: Mapping[str, Any],
    state: RecordDict,
) -> RecordDict:
    """The reply content to ``message`` (see the module docstring), checked by
    `fedsp.flower.records.check_reply`; ``state`` is the node's context state, where a
    held-back update waits for ``train.upload``."""
    reply = _answer(message, run_config, node_config, state)
    records.check_reply(reply)
    return reply


def _answer(message, run_config, node_config, state) -> RecordDict:
    kind = message.metadata.message_type
    if kind == "query.identify":
        config = settings.load_config(
            str(run_config["config"]), str(run_config.get("overrides", ""))
        )
        client = settings.node_client(config, node_config)
        return RecordDict({"node": MetricRecord({"client": client})})
    if kind == "train" or kind == "train.default":
        node = load_node(run_config, node_config)
        reply, held = node.train(message.content)
        for key in (_PENDING, _PENDING_ROUND):
            if key in state:
                del state[key]
        if held is not None:
            state[_PENDING] = held
            state[_PENDING_ROUND] = ConfigRecord(
                {"round": int(records.scalar(message.content["round"], "round"))}
            )
        return reply
    if kind == "train.upload":
        want = int(records.scalar(message.content.get("round"), "round"))
        pending = state.get(_PENDING)
        held_round = state.get(_PENDING_ROUND)
        if not isinstance(pending, ArrayRecord) or not isinstance(held_round, ConfigRecord):
            raise ValueError(f"train.upload for round {want}: this node holds no update")
        held_for = int(records.scalar(held_round, "round"))
        if held_for != want:
            raise ValueError(
                f"train.upload for round {want}: this node holds round {held_for}'s update"
            )
        del state[_PENDING], state[_PENDING_ROUND]
        return RecordDict({"adapters": pending})
    raise ValueError(f"unknown message type {kind!r}")
