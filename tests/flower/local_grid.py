"""An in-process `flwr.serverapp.Grid`: each node is a ClientApp handler with its own
node config and context state, called directly (for fast tests of the apps' logic; the
localhost deployment tests run the real SuperLink and SuperNodes)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsp.flower import client


class LocalGrid:
    """Routes messages to ``client.handle`` of nodes 1..N; records every reply.

    Attributes:
      replies: every reply message the nodes sent, in order.
      down: every message the server sent.
      gone: node ids that stop answering (a killed node).
      kill_after: ``{node: n}``: the node is gone after answering n train messages.
      withhold: nodes that leave their adapters out of every reply (a hostile client).
    """

    def __init__(
        self,
        run_config: Mapping[str, Any],
        node_configs: list[dict[str, Any]],
        *,
        kill_after: Mapping[int, int] | None = None,
        withhold: Sequence[int] = (),
    ):
        self.run_config = dict(run_config)
        self.node_configs = {i + 1: dict(c) for i, c in enumerate(node_configs)}
        self.states = {n: RecordDict() for n in self.node_configs}
        self.replies: list[Message] = []
        self.down: list[Message] = []
        self.gone: set[int] = set()
        self.kill_after = dict(kill_after or {})
        self.withhold = set(withhold)
        self.trained = dict.fromkeys(self.node_configs, 0)
        # Nodes load their run now, outside the server's device mesh (a real node is its
        # own process).
        for node_config in self.node_configs.values():
            client.load_node(self.run_config, node_config)
        # Outside a Flower process no run is set; messages need one.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_configs if n not in self.gone]

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        out = []
        for message in messages:
            self.down.append(message)
            node = message.metadata.dst_node_id
            if node in self.gone:
                continue
            # The wire copies: the node never shares objects with the server.
            received = Message(
                wire_copy(message.content),
                node,
                message.metadata.message_type,
                group_id=message.metadata.group_id,
            )
            content = client.handle(
                received, self.run_config, self.node_configs[node], self.states[node]
            )
            if node in self.withhold and "adapters" in content:
                del content["adapters"]
            reply = Message(wire_copy(content), reply_to=message)
            if message.metadata.message_type == "train":
                self.trained[node] += 1
                if self.trained[node] >= self.kill_after.get(node, 1 << 30):
                    self.gone.add(node)
            self.replies.append(reply)
            out.append(reply)
        return out


def wire_copy(content: RecordDict) -> RecordDict:
    """A copy of ``content`` sharing no object with it (arrays as fresh bytes)."""
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            fresh = ArrayRecord()
            for key, a in record.items():
                fresh[key] = Array(
                    dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=bytes(a.data)
                )
            out[name] = fresh
        else:
            out[name] = type(record)(copy.deepcopy(dict(record)))
    return out
