"""The server of a Flower federation: fedsp's round loop, with the clients' updates asked
of the federation's nodes.

`serve` is `fedsp.run` (sampling, server step, evaluation, player pool, ``metrics.jsonl``,
checkpoints and exact resume, all unchanged) with `FlowerUpdates` as its
``RoundHooks.client_updates``: for the round's sampled clients it finds their nodes,
sends each its ``train`` message (θ_r, the round, the client's position among the
sampled clients and its reward baseline; a pool's players as arrays) and turns the
replies into the round's `ClientUploads`. The server never reads the training split.

Pruning on the wire: with ``fl.prune_threshold`` set, nodes first send only their scalar
statistics; the server computes the clients' weights and keep mask exactly as the
server step will (`upload_mask`) and asks only the kept clients for their adapters
(``train.upload``). Without a threshold every client that trained on something sends
its adapters with its statistics (one exchange per round); one that trained on nothing
never does (its weight is 0 in every weighting). A client without adapters holds θ_r
with weight 0 in the server step (NaN when the node reported a non-finite update, so it
is counted as rejected, as in the simulator): the step gives the simulator's numbers.

Simulated faults stay on: ``fl.sampling``, ``fl.dropout``, ``fl.straggler`` and
``fl.byzantine`` act as in the simulator, since `fedsp.run_round` draws them from
(seed, round, client) around this hook. The clients that would drop out or miss the
deadline are not asked at all (the others' positions, ``slot``, are counted without
them, as the simulator counts them), and the Byzantine clients' uploads are poisoned on
arrival. A real federation leaves them at their defaults (off) and meets real failures
through the timeouts below.

Failures: the server waits at most ``node-timeout`` for the sampled clients' nodes to
connect and ``reply-timeout`` for their replies; clients without an update are the
record's ``dropped``. A round with fewer updates than ``min-clients`` raises, naming the
clients and what it waited for; the checkpoints before it stay, and running the app
again resumes after the last one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedsp.federated import ClientUploads, RoundHooks, Run
from fedsp.federated.server import finite_client_weights
from fedsp.flower import records, settings
from fedsp.runner import run
from fedsp.selfplay.base import RoundContext

__all__ = ["FlowerUpdates", "message_bytes", "serve", "upload_mask"]

_log = logging.getLogger(__name__)
PyTree = Any
_POLL_S = 1.0


def message_bytes(message: Message) -> int:
    """Bytes of the objects Flower pushes for ``message``: its own serialisation and its
    records' and arrays' (each object once)."""
    seen: set[str] = set()

    def visit(obj: Any) -> int:
        if obj.object_id in seen:
            return 0
        seen.add(obj.object_id)
        return len(obj.deflate()) + sum(visit(c) for c in (obj.children or {}).values())

    return visit(message)


class FlowerUpdates:
    """`RoundHooks.client_updates` that asks the federation's nodes (module docstring)."""

    def __init__(
        self,
        grid: Grid,
        federation: settings.FederationSettings,
        fingerprint: Mapping[str, Any],
    ):
        self.grid = grid
        self.federation = federation
        self.fingerprint = json.dumps(dict(fingerprint), sort_keys=True)
        self.node_of: dict[int, int] = {}  # client -> node id

    # ----------------------------------------------------------------- nodes
    def _identify(self, nodes: Iterable[int]) -> None:
        known = set(self.node_of.values())
        ask = [n for n in nodes if n not in known]
        if not ask:
            return
        messages = [
            self.grid.create_message(RecordDict(), "query.identify", n, "identify") for n in ask
        ]
        for reply in self.grid.send_and_receive(messages, timeout=self.federation.reply_timeout):
            if reply.has_error():
                _log.warning(
                    "node %d could not say which client it is: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            client = int(records.scalar(reply.content.get("node"), "client"))
            self.node_of[client] = reply.metadata.src_node_id

    def nodes_for(self, clients: Sequence[int]) -> dict[int, int]:
        """``{client: node id}`` for the ``clients`` whose nodes are connected, waiting up
        to ``node-timeout`` for the others."""
        deadline = time.monotonic() + self.federation.node_timeout
        while True:
            connected = set(self.grid.get_node_ids())
            self.node_of = {c: n for c, n in self.node_of.items() if n in connected}
            self._identify(connected)
            found = {int(c): self.node_of[int(c)] for c in clients if int(c) in self.node_of}
            if len(found) == len(clients) or time.monotonic() > deadline:
                return found
            _log.info(
                "waiting for the nodes of clients %s (%d node(s) connected)",
                sorted(set(map(int, clients)) - set(found)),
                len(connected),
            )
            time.sleep(_POLL_S)

    # ----------------------------------------------------------------- round
    def __call__(
        self,
        run: Run,
        params: PyTree,
        rng: jax.Array,
        round: int,
        clients: Sequence[int],
        baselines: np.ndarray,
        *,
        context: RoundContext | None = None,
    ) -> tuple[ClientUploads, dict[str, Any], dict[str, float]]:
        del rng  # every node derives the round's keys from the shared seed
        start = time.perf_counter()
        fl = run.config.fl
        clients = [int(k) for k in clients]
        nodes = self.nodes_for(clients)
        two_phase = fl.prune_threshold is not None
        theta = records.tree_to_record(params)
        extra = self._pool_records(context)
        down = up = 0
        messages = []
        for slot, (k, b) in enumerate(zip(clients, baselines)):
            if k not in nodes:
                continue
            spec = ConfigRecord(
                {
                    "round": round,
                    "client": k,
                    "slot": slot,
                    "baseline": float(b),
                    "upload": int(not two_phase),
                    "fingerprint": self.fingerprint,
                }
            )
            content = RecordDict({"params": theta, "round": spec, **extra})
            messages.append(self.grid.create_message(content, "train", nodes[k], str(round)))
            down += message_bytes(messages[-1])
        replies = self._collect(messages, nodes)
        up += sum(message_bytes(r) for r in replies.values())
        answered = [k for k in clients if k in replies]
        self._check_enough(round, clients, answered, nodes)
        stats = {
            key: np.asarray(
                [records.scalar(replies[k].content.get("stats"), key) for k in answered],
                np.float32,
            )
            for key in _keys(replies[answered[0]].content.get("stats"))
        }
        finite = stats.pop("finite") > 0.5
        keep = upload_mask(fl, stats, finite)
        if two_phase:
            asks = [
                self.grid.create_message(
                    RecordDict({"round": ConfigRecord({"round": round})}),
                    "train.upload",
                    nodes[k],
                    str(round),
                )
                for k, kept in zip(answered, keep)
                if kept
            ]
            down += sum(message_bytes(m) for m in asks)
            uploads = self._collect(asks, nodes)
            up += sum(message_bytes(r) for r in uploads.values())
            adapter_records = {k: uploads[k].content.get("adapters") for k in uploads}
        else:
            adapter_records = {k: replies[k].content.get("adapters") for k in answered}
        # A client the server step would weight must have sent adapters; one that did
        # not (it went away between the two exchanges, or withheld them) is dropped
        # rather than counted as θ_r.
        missing = [
            k
            for k, kept in zip(answered, keep)
            if kept and not isinstance(adapter_records.get(k), ArrayRecord)
        ]
        if missing:
            _log.warning("round %d: client(s) %s sent no adapters: dropped", round, missing)
            idx = [i for i, k in enumerate(answered) if k not in missing]
            answered = [answered[i] for i in idx]
            stats = {key: v[idx] for key, v in stats.items()}
            finite = finite[idx]
            self._check_enough(round, clients, answered, nodes)
        per_client = []
        nan = jax.tree.map(lambda x: np.full(x.shape, np.nan, x.dtype), params)
        for k, ok in zip(answered, finite):
            record = adapter_records.get(k)
            if isinstance(record, ArrayRecord):
                per_client.append(
                    records.record_to_tree(record, params, name=f"client {k}'s adapters")
                )
            else:  # weight 0 (pruned, or trained on nothing): never sent
                per_client.append(params if ok else nan)
        stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *per_client)
        collect = _mean_metrics([replies[k].content["collect"] for k in answered])
        collect["wire/download_bytes"] = float(down)
        collect["wire/upload_bytes"] = float(up)
        train_s = max(records.scalar(replies[k].content.get("time"), "train_s") for k in answered)
        wall = time.perf_counter() - start
        uploads_out = ClientUploads(
            clients=np.asarray(answered), params=stacked, stats=stats, round=round
        )
        return uploads_out, collect, {"rollout_s": wall - train_s, "train_s": train_s}

    def _collect(self, messages: list[Message], nodes: Mapping[int, int]) -> dict[int, Message]:
        client_of = {n: c for c, n in nodes.items()}
        out: dict[int, Message] = {}
        if not messages:
            return out
        for reply in self.grid.send_and_receive(messages, timeout=self.federation.reply_timeout):
            client = client_of.get(reply.metadata.src_node_id)
            if client is None:
                continue
            if reply.has_error():
                _log.warning(
                    "client %d (node %d) failed: %s",
                    client,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            out[client] = reply
        return out

    def _check_enough(self, round: int, clients, answered, nodes) -> None:
        if len(answered) >= self.federation.min_clients:
            return
        missing = [k for k in clients if k not in answered]
        raise RuntimeError(
            f"round {round}: {len(answered)} of {len(clients)} sampled clients sent an update, "
            f"min-clients is {self.federation.min_clients}. Missing clients {missing}: "
            f"{[k for k in missing if k not in nodes]} had no connected node after "
            f"node-timeout={self.federation.node_timeout:g}s, the others sent no reply within "
            f"reply-timeout={self.federation.reply_timeout:g}s. The checkpoints of earlier "
            "rounds are kept; run the app again to resume."
        )

    @staticmethod
    def _pool_records(context: RoundContext | None) -> dict[str, Any]:
        if context is None or context.players is None:
            return {}
        return {
            "players": records.tree_to_record(context.players),
            "pool": ConfigRecord(
                {
                    "player_mask": [bool(m) for m in np.asarray(context.player_mask)],
                    "player_rounds": [int(r) for r in context.player_rounds],
                }
            ),
        }


def upload_mask(fl: Any, stats: Mapping[str, np.ndarray], finite: np.ndarray) -> np.ndarray:
    """[C] the clients the server step will keep (weight > 0), from their reported
    ``num_examples`` and ``mean_advantage`` and whether their update is finite, by the
    server step's own rule (`fedsp.federated.server.finite_client_weights`); ``fl`` is
    ``config.fl``."""
    n = np.asarray(stats["num_examples"], np.float32)
    finite = np.asarray(finite, bool) & np.isfinite(n)
    _, keep = finite_client_weights(
        jnp.asarray(n),
        jnp.asarray(stats["mean_advantage"], jnp.float32),
        jnp.asarray(finite),
        fl.client_weighting,
        float(fl.weight_temperature),
        None if fl.prune_threshold is None else float(fl.prune_threshold),
    )
    return np.asarray(keep)


def _keys(record: Any) -> list[str]:
    if not isinstance(record, MetricRecord):
        raise ValueError("a client's reply lacks its 'stats' MetricRecord")
    return list(record)


def _mean_metrics(items: Iterable[Any]) -> dict[str, float]:
    items = [m for m in items if isinstance(m, MetricRecord)]
    keys = sorted({k for m in items for k in m})
    return {k: float(np.mean([records.scalar(m, k) for m in items if k in m])) for k in keys}


def serve(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Runs (or resumes) the federation's rounds from the Flower run config (see
    `fedsp.flower.settings`); returns `fedsp.run`'s summary."""
    if "workdir" not in run_config:
        raise ValueError("run config needs workdir (the server's run directory)")
    config = settings.load_config(str(run_config["config"]), str(run_config.get("overrides", "")))
    federation = settings.FederationSettings.from_run_config(run_config)
    hook = FlowerUpdates(grid, federation, settings.fingerprint(config))
    return run(
        config,
        str(run_config["workdir"]),
        hooks=RoundHooks(client_updates=hook),
        train_data=False,
    )
