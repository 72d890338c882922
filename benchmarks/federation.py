"""A Flower federation on localhost: wall time of a run and bytes on the wire per round,
with and without advantage pruning.

    python -m benchmarks.federation                       # the figures in BENCHMARKS.md
    python -m benchmarks.federation --config experiments/configs/demo.py \\
        --overrides "data.num_clients=2 fl.clients_per_round=2" --nodes 2

Starts a SuperLink and ``--nodes`` SuperNodes on 127.0.0.1 (`fedsp.flower.deploy`), runs
``flower_app`` with the config twice, once as given and once with
``fl.prune_threshold=--prune`` (pruned clients send their statistics but never their
adapters), and prints per round the bytes the server sent and received (what Flower
pushes for the messages: `fedsp.flower.server.message_bytes`), the adapters' bytes the
round's record counts as sent and saved, and each run's wall time from ``flwr run`` to
its end (the server's model loading and evaluation included).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from typing import Any

from fedsp.flower.deploy import LocalFederation

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_once(config: str, overrides: str, nodes: int, home: pathlib.Path) -> dict[str, Any]:
    node_configs = [{"partition-id": k, "num-partitions": nodes} for k in range(nodes)]
    workdir = home / "run"
    with LocalFederation(REPO / "flower_app", nodes, node_configs=node_configs, home=home) as fed:
        start = time.perf_counter()
        fed.run({"config": config, "overrides": overrides, "workdir": str(workdir)}, 3600)
        wall = time.perf_counter() - start
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": round(wall, 1),
        "rounds": [
            {
                "round": r["round"],
                "down_bytes": r["collect/wire/download_bytes"],
                "up_bytes": r["collect/wire/upload_bytes"],
                "adapter_bytes_sent": r["bytes_sent"],
                "adapter_bytes_saved": r["bytes_saved"],
                "pruned": r["pruned"],
                "accuracy": r.get("eval/accuracy"),
            }
            for r in records[1:]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "experiments/configs/demo.py"))
    parser.add_argument(
        "--overrides",
        default=(
            "data.num_clients=2 fl.clients_per_round=2 fl.rounds=2 eval.examples=16 "
            "fl.client_weighting='advantage'"
        ),
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--prune", type=float, default=0.0)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    result: dict[str, Any] = {"config": args.config, "overrides": args.overrides}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("as_given", ""), ("pruned", f" fl.prune_threshold={args.prune}")):
            home = pathlib.Path(tmp) / name
            result[name] = run_once(
                str(pathlib.Path(args.config).resolve()), args.overrides + extra, args.nodes, home
            )
            print(name, json.dumps(result[name]), flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
