"""fedsp-toy-app: the ServerApp averages the nodes' replies for a few rounds.

Each round sends the current arrays to every connected node and replaces them by the
mean of the replies that arrive within `reply-timeout-s` (all of them when 0). After
every round it rewrites `result-path` (JSON) with what it saw, so a test can follow the
run and check its end.
"""

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while len(node_ids := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(node_ids)} of {count} nodes connected in {timeout_s} s")
        time.sleep(0.5)
    return node_ids


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs `num-server-rounds` rounds of averaging over the nodes."""
    cfg = context.run_config
    result_path = str(cfg["result-path"])
    timeout = float(cfg["reply-timeout-s"]) or None
    node_ids = _wait_for_nodes(grid, int(cfg["min-nodes"]), float(cfg["wait-for-nodes-s"]))
    arrays = [np.zeros(3, dtype=np.float32)]
    result: dict[str, Any] = {
        "node_ids": node_ids,
        "server_env": os.environ.get(str(cfg["echo-env"]), "<unset>"),
        "rounds": [],
        "done": False,
    }
    for server_round in range(1, int(cfg["num-server-rounds"]) + 1):
        content = RecordDict(
            {
                "arrays": ArrayRecord(arrays),
                "config": ConfigRecord({"server-round": server_round}),
            }
        )
        messages = [
            Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN)
            for node_id in node_ids
        ]
        start = time.monotonic()
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        ok = [r for r in replies if not r.has_error()]
        if ok:
            stacked = [r.content["arrays"].to_numpy_ndarrays() for r in ok]
            arrays = [np.mean(layer, axis=0) for layer in zip(*stacked)]
        result["rounds"].append(
            {
                "round": server_round,
                "seconds": time.monotonic() - start,
                "replied_nodes": sorted(r.metadata.src_node_id for r in ok),
                "errors": [str(r.error.reason) for r in replies if r.has_error()],
                "partition_ids": sorted(int(r.content["metrics"]["partition-id"]) for r in ok),
                "client_env": sorted(str(r.content["echo"]["env"]) for r in ok),
                "client_pythonpath": sorted(str(r.content["echo"]["pythonpath"]) for r in ok),
                "arrays": [a.tolist() for a in arrays],
            }
        )
        print(f"toy server: round {server_round}: {len(ok)} of {len(messages)} replies")
        _write(result_path, result)
    result["done"] = True
    _write(result_path, result)


def _write(path: str, result: dict[str, Any]) -> None:
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
