"""The capacity planner's JSON lines (``python -m experiments.plan --json=FILE``) as the
markdown table of BENCHMARKS.md ("Capacity planner"):

    python -m benchmarks.plan_table runs/plan/paper.jsonl

One row per planned config: its model, target, clients per round and mesh, the memory levers it sets, each
program's per-device peak (arguments + outputs + temporaries, and the caches the rollout
keeps) and whether the round fits one device.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

PROGRAMS = ("rollout", "train", "server", "players", "eval")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def row(record: dict[str, Any]) -> str:
    levers = record.get("levers", {})
    peaks = {p["name"]: p for p in record["programs"]}
    cells = []
    for name in PROGRAMS:
        p = peaks.get(name)
        if p is None:
            cells.append("—")
            continue
        text = gib(p["peak_bytes"])
        if p.get("held_bytes"):
            text += f" (kept caches {gib(p['held_bytes'])})"
        cells.append(("≥ " if p.get("error") else "") + text)
    config = pathlib.Path(record["config"])
    model = record["model"]
    return (
        f"| {config.parent.name}/{config.stem} "
        f"| {model['model_type']} L={model['num_hidden_layers']} D={model['hidden_size']} "
        f"| {record['target']} ({record['devices']} × {gib(record['memory_bytes'])} GiB) "
        f"| {levers.get('fl.clients_per_round', '?')} "
        f"| ({record['mesh'][0]}, {record['mesh'][1]}) "
        f"| {levers.get('model.remat', '?')} / {levers.get('local.micro_batch_size', '?')} "
        f"| {levers.get('rollout.batch_size', '?')}"
        f"{'' if levers.get('rollout.reuse_cache', True) else ' (no cache reuse)'} "
        f"/ {levers.get('eval.batch_size', '?')} "
        f"| {' | '.join(cells)} | {gib(record['peak_bytes'])} | "
        f"{'yes' if record['fits'] else '**no**'} |"
    )


def table(records: Sequence[dict[str, Any]]) -> str:
    head = (
        "| config | model | target | clients | mesh (clients, model) | remat / micro-batch "
        "| rollout / eval batch "
        "| rollout | train | server | players | eval | peak (GiB per device) | fits |"
    )
    rule = "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|"
    return "\n".join([head, rule, *(row(r) for r in records)])


def main(argv: Sequence[str]) -> None:
    records = [json.loads(line) for f in argv for line in pathlib.Path(f).read_text().splitlines()]
    print(table(records))


if __name__ == "__main__":
    main(sys.argv[1:])
