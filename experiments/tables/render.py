"""A table's numbers and how they are shown: `collect` reads the rows off the cells'
learning curves (mean ± sample std over seeds, rounds and bytes to a target accuracy,
whether raw text left a client, Byzantine clients met per round and the ε spent),
`render_markdown` writes ``NAME.md``, `plot_curves` ``NAME.png``, and `jsonable` makes
the results JSON-safe for ``NAME.json``.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.tables.base import Table
from experiments.tables.robustness import DP_GROUP

# --------------------------------------------------------------------------- numbers


def rounds_to_target(accuracy: dict[Any, float], target: float) -> int | None:
    """The first evaluated round whose accuracy is ≥ ``target`` (0: already at round 0);
    None if no round reaches it. Accuracies are fractions k/n and the target is computed
    from them, so "reaches" allows for float rounding (1e-9)."""
    for rnd in sorted(accuracy, key=int):
        if accuracy[rnd] is not None and accuracy[rnd] >= target - 1e-9:
            return int(rnd)
    return None


def bytes_until(bytes_sent: dict[Any, int], last_round: int) -> int:
    """Bytes sent by the clients in rounds 1..``last_round``."""
    return int(sum(v for r, v in bytes_sent.items() if 0 < int(r) <= last_round))


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std (ddof = 1; NaN for one value), n) over the non-None values."""
    xs = np.asarray([v for v in values if v is not None], np.float64)
    if xs.size == 0:
        return math.nan, math.nan, 0
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else math.nan, int(xs.size)


def accuracy_at(curve: dict[str, float], rnd: int | None) -> float | None:
    if rnd is None:
        return curve[max(curve, key=int)] if curve else None
    return curve.get(str(rnd))


def final_epsilon(curves: dict[str, Any]) -> float:
    """The ε spent after a cell's last round (its last ``dp/epsilon``); ∞ for a cell
    without DP (no ``dp/epsilon`` in its records) or without noise (null: ∞)."""
    epsilon = curves.get("epsilon") or {}
    if not epsilon:
        return math.inf
    last = epsilon[max(epsilon, key=int)]
    return math.inf if last is None else float(last)


def attackers_per_round(curves: dict[str, Any]) -> float | None:
    """The mean number of Byzantine clients among a cell's uploads over its rounds
    (the records' ``byzantine``); None if the records do not say."""
    counts = [v for r, v in (curves.get("byzantine") or {}).items() if int(r) > 0]
    return float(np.mean(counts)) if counts else None


def collect(
    table: Table, results: list[dict[str, Any]], *, target: float | None = None
) -> dict[str, Any]:
    """The table's numbers from its cells' results (dicts with ``run``, ``dataset``,
    ``seed``, ``summary``, ``curves``, ``audit``, ``config``): per-seed values and
    mean/std per (row, dataset)."""
    by = {(r["run"], r["dataset"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    out: dict[str, Any] = {"rows": {}, "seeds": seeds}
    for row in table.rows:
        out["rows"][row.key] = {}
        for dataset in table.datasets:
            per_seed = {
                s: accuracy_at(by[(row.run, dataset, s)]["curves"]["accuracy"], row.round)
                for s in seeds
                if (row.run, dataset, s) in by
            }
            mean, std, n = mean_std(list(per_seed.values()))
            out["rows"][row.key][dataset] = {"per_seed": per_seed, "mean": mean, "std": std, "n": n}
    if table.kind in ("aggregation", "settings", "robustness"):
        out["targets"] = {}
        for dataset in table.datasets:
            if target is not None:
                goal, rule = float(target), "absolute (--target)"
            else:
                ref = [
                    r for r in results if r["run"] == table.target_run and r["dataset"] == dataset
                ]
                start = mean_std([accuracy_at(r["curves"]["accuracy"], 0) for r in ref])[0]
                best = mean_std([max(r["curves"]["accuracy"].values()) for r in ref])[0]
                goal = start + table.target_fraction * (best - start)
                rule = (
                    f"round-0 accuracy + {table.target_fraction:g} × (best − round-0) of "
                    f"{table.target_run}, means over seeds"
                    if ref
                    else f"undefined: no {table.target_run} cell ran; pass --target"
                )
            out["targets"][dataset] = {"target": goal, "rule": rule}
            for row in table.rows:
                cell = out["rows"][row.key][dataset]
                reached, sent, total_sent, total_saved, text = {}, {}, {}, {}, {}
                for s in seeds:
                    r = by.get((row.run, dataset, s))
                    if r is None:
                        continue
                    rtt = rounds_to_target(r["curves"]["accuracy"], goal)
                    reached[s] = rtt
                    sent[s] = None if rtt is None else bytes_until(r["curves"]["bytes_sent"], rtt)
                    total_sent[s] = r["summary"]["bytes_sent"]
                    total_saved[s] = r["summary"]["bytes_saved"]
                    text[s] = raw_text_left_client(r)
                cell.update(
                    rounds_to_target=reached,
                    bytes_to_target=sent,
                    bytes_sent=total_sent,
                    bytes_saved=total_saved,
                    raw_text_left_client=text,
                    rounds_to_target_stat=mean_std(list(reached.values())),
                    bytes_sent_stat=mean_std(list(total_sent.values())),
                    bytes_to_target_stat=mean_std(list(sent.values())),
                    bytes_saved_stat=mean_std(list(total_saved.values())),
                )
    if table.kind == "robustness":
        for row in table.rows:
            for dataset in table.datasets:
                ran = {s: by[(row.run, dataset, s)] for s in seeds if (row.run, dataset, s) in by}
                attackers = {s: attackers_per_round(r["curves"]) for s, r in ran.items()}
                epsilon = {s: final_epsilon(r["curves"]) for s, r in ran.items()}
                out["rows"][row.key][dataset].update(
                    byzantine_clients=byzantine_count(next(iter(ran.values()))["config"])
                    if ran
                    else None,
                    attackers_per_round=attackers,
                    attackers_per_round_stat=mean_std(list(attackers.values())),
                    epsilon=epsilon,
                )
    return out


def byzantine_count(config: dict[str, Any]) -> tuple[int, int]:
    """(attackers, clients) of a cell's saved config: the ⌊fraction · N⌋ Byzantine
    clients `fedsp.federated.faults.byzantine_clients` makes of its N clients."""
    from fedsp.federated.faults import byzantine_clients

    clients = int(config["data"]["num_clients"])
    fraction = float(config["fl"]["byzantine"]["fraction"])
    return len(byzantine_clients(clients, fraction, 0)), clients


def raw_text_left_client(result: dict[str, Any]) -> bool | None:
    """True if the cell pooled several users' text in one holder (centralized) or any
    non-array leaf reached the server; None when the cell has no audit (it ran without
    `ServerAudit`)."""
    audit = result.get("audit")
    pooled = result["config"]["data"]["num_clients"] == 1
    if audit is None:
        return True if pooled else None
    return bool(pooled or audit["text_leaves"] > 0)


# --------------------------------------------------------------------------- markdown


def _fmt(stat: tuple[float, float, int], digits: int = 3, total: int | None = None) -> str:
    mean, std, n = stat
    if n == 0:
        return "—"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    if total is not None and n < total:
        text += f" ({n}/{total})"
    return text


def render_markdown(table: Table, numbers: dict[str, Any], meta: dict[str, Any]) -> str:
    total = len(numbers["seeds"])
    lines = [
        f"# {table.title}",
        "",
        f"Scale: **{meta['scale']}**; seeds {numbers['seeds']}; mean ± sample std "
        f"(ddof = 1) over seeds; `(k/n)`: only k of n seeds have the value.",
        "",
    ]
    if table.kind == "accuracy":
        lines += [
            "| method | " + " | ".join(table.datasets) + " |",
            "|---|" + "---|" * len(table.datasets),
        ]
        for row in table.rows:
            cells_ = [
                _fmt((v["mean"], v["std"], v["n"]), total=total)
                for v in (numbers["rows"][row.key][d] for d in table.datasets)
            ]
            lines.append(f"| {row.label} | " + " | ".join(cells_) + " |")
    else:
        for dataset in table.datasets:
            goal = numbers["targets"][dataset]
            lines += [f"{dataset}: target accuracy {goal['target']:.3f} ({goal['rule']}).", ""]
            if table.kind == "robustness":
                lines += _robustness_lines(table, numbers["rows"], dataset, total)
                continue
            if table.kind == "aggregation":
                lines += [
                    "| method | final accuracy | rounds to target | MB sent to target "
                    "| MB sent (all rounds) | MB not sent (pruned or empty clients) |",
                    "|---|---|---|---|---|---|",
                ]
            else:
                lines += [
                    "| setting | final accuracy | rounds to target | raw text left a client |",
                    "|---|---|---|---|",
                ]
            for row in table.rows:
                v = numbers["rows"][row.key][dataset]
                acc = _fmt((v["mean"], v["std"], v["n"]), total=total)
                rtt = _fmt(v["rounds_to_target_stat"], 1, total)
                if table.kind == "aggregation":
                    mb = [
                        _fmt((v[k][0] / 1e6, v[k][1] / 1e6, v[k][2]), 2, total)
                        for k in ("bytes_to_target_stat", "bytes_sent_stat", "bytes_saved_stat")
                    ]
                    lines.append(f"| {row.label} | {acc} | {rtt} | " + " | ".join(mb) + " |")
                else:
                    flags = set(v["raw_text_left_client"].values())
                    text = (
                        "unknown"
                        if None in flags or not flags
                        else "yes"
                        if flags == {True}
                        else "no"
                        if flags == {False}
                        else "mixed"
                    )
                    lines.append(f"| {row.label} | {acc} | {rtt} | {text} |")
            if table.kind == "aggregation":
                lines += [_speedup(numbers["rows"], dataset), ""]
            lines.append("")
    shared = [f"{name} = {where}" for name, where in meta.get("shared_cells", {}).items()]
    commits = meta.get("cell_commits", {})
    lines += [
        "",
        f"Notes: {table.notes}" if table.notes else "",
        "",
        "## Budget",
        "",
        f"Stated CPU budget (2 cores, CPU scale, 3 seeds): {table.cpu_budget_h:g} h"
        + (
            f" for the cells it runs itself; {len(shared)} of its cells are another "
            f"table's (same config, run once): {', '.join(shared)}. "
            if shared
            else ". "
        )
        + (
            f"Cost-model estimate for all its cells: {meta['estimated_s'] / 3600:.2f} h; "
            if meta["scale"] == "cpu"
            else ""
        )
        + f"measured wall time of the cells in this invocation: "
        f"{meta['measured_s'] / 3600:.2f} h (finished cells it skipped count as their "
        f"saved summaries say)"
        + (
            f"; their rounds alone, over every process that ran them: "
            f"{meta['rounds_s'] / 3600:.2f} h"
            if "rounds_s" in meta
            else ""
        )
        + (
            f". Table written by a process started at commit {meta['commit']}"
            if meta.get("commit")
            else ""
        )
        + (f"; its cells ran at {_commit_summary(commits)}." if commits else "."),
        "",
        "## Command",
        "",
        "```",
        meta["command"],
        "```",
        "",
    ]
    return "\n".join(lines)


def _fmt_epsilon(values: Sequence[float]) -> str:
    """ε over seeds: one number when they agree (it depends on the config alone), ∞
    without noise, mean ± std otherwise."""
    if not values:
        return "—"
    if all(v == values[0] for v in values):
        return "∞" if math.isinf(values[0]) else f"{values[0]:.2f}"
    return _fmt(mean_std([v for v in values if math.isfinite(v)]), 2, len(values))


def _robustness_lines(table: Table, rows: dict[str, Any], dataset: str, total: int) -> list[str]:
    """The robustness table of one dataset: the Byzantine rows (grouped by aggregator),
    then the DP-FedAvg rows."""
    byzantine = [r for r in table.rows if r.group != DP_GROUP]
    dp = [r for r in table.rows if r.group == DP_GROUP]
    lines = [
        "| aggregator | Byzantine clients | final accuracy | rounds to target "
        "| attackers among a round's uploads (measured) |",
        "|---|---|---|---|---|",
    ]
    for row in byzantine:
        v = rows[row.key][dataset]
        count = v["byzantine_clients"]
        clients = row.label + (f" ({count[0]} of {count[1]} clients)" if count else "")
        lines.append(
            f"| {row.group} | {clients} | {_fmt((v['mean'], v['std'], v['n']), total=total)} "
            f"| {_fmt(v['rounds_to_target_stat'], 1, total)} "
            f"| {_fmt(v['attackers_per_round_stat'], 2, total)} |"
        )
    if dp:
        lines += [
            "",
            "| DP-FedAvg noise multiplier | ε after the last round | final accuracy "
            "| rounds to target |",
            "|---|---|---|---|",
        ]
        for row in dp:
            v = rows[row.key][dataset]
            lines.append(
                f"| {row.label} | {_fmt_epsilon(list(v['epsilon'].values()))} "
                f"| {_fmt((v['mean'], v['std'], v['n']), total=total)} "
                f"| {_fmt(v['rounds_to_target_stat'], 1, total)} |"
            )
    return [*lines, ""]


def _speedup(rows: dict[str, Any], dataset: str) -> str:
    """Advantage weighting vs FedAvg in mean rounds to the target, as measured."""
    fed, adv = (rows[k][dataset]["rounds_to_target_stat"] for k in ("fedavg", "advantage"))
    if fed[2] == 0 or adv[2] == 0 or fed[0] == 0:
        return (
            "Rounds to target, advantage-weighted vs FedAvg: not comparable (a run did "
            "not reach the target, or FedAvg started at it)."
        )
    fewer = 1 - adv[0] / fed[0]
    return (
        f"Rounds to target, advantage-weighted vs FedAvg: {adv[0]:.2f} vs {fed[0]:.2f} "
        f"(means over the seeds that reached it): {abs(fewer):.0%} "
        f"{'fewer' if fewer >= 0 else 'more'} rounds (the claim: about 40% fewer)."
    )


def _commit_summary(cell_commits: dict[str, list[str]]) -> str:
    """ "commit X (all 6 cells)" or "commits X (4 cells), Y (2 cells), unrecorded (1 cell)":
    how many cells ran (in part) at each commit; a cell resumed across commits counts
    under each."""
    counts: dict[str, int] = {}
    for commits in cell_commits.values():
        for commit in dict.fromkeys(commits or ["unrecorded"]):
            counts[commit] = counts.get(commit, 0) + 1
    if len(counts) == 1:
        ((commit, n),) = counts.items()
        return (
            f"commit {commit} (all {n} cells)"
            if commit != "unrecorded"
            else f"commits that were not recorded (all {n} cells)"
        )
    return "commits " + ", ".join(f"{c} ({n} cell{'s' * (n != 1)})" for c, n in counts.items())


# --------------------------------------------------------------------------- plot


def plot_curves(table: Table, results: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Accuracy vs round per dataset (mean over seeds, ± std band); the aggregation
    table adds accuracy vs cumulative MB sent. A table whose rows have groups gets one
    panel per group and dataset, with the group's rows as curves; the robustness table
    adds the DP utility curve: final accuracy vs noise multiplier, each point labelled
    with its ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(row.group for row in table.rows if row.group))
    # (dataset, x axis, title, [(run key, curve label)])
    panels: list[tuple[str, str, str, list[tuple[str, str]]]] = []
    for dataset in table.datasets:
        if groups:
            panels += [
                (
                    dataset,
                    "round",
                    f"{dataset}: {group}",
                    [(r.run, r.label) for r in table.rows if r.group == group],
                )
                for group in groups
            ]
        else:
            panels.append((dataset, "round", dataset, [(r.key, r.label) for r in table.runs]))
    if table.kind == "aggregation":
        panels += [
            (d, "MB sent", d, [(r.key, r.label) for r in table.runs]) for d in table.datasets
        ]
    utility = table.kind == "robustness" and any(r.group == DP_GROUP for r in table.rows)
    width = len(panels) + (len(table.datasets) if utility else 0)
    fig, axes = plt.subplots(1, width, figsize=(4.5 * width, 3.4), squeeze=False)
    # Grouped panels share the accuracy axis, and a row keeps its colour (its place in
    # its group: 0% / 10% / 25% alike under every aggregator).
    if groups:
        for ax in axes[0][1 : len(panels)]:
            ax.sharey(axes[0][0])
    for ax, (dataset, x_axis, title, curves) in zip(axes[0], panels):
        for i, (key, label) in enumerate(curves):
            runs = [r["curves"] for r in results if r["run"] == key and r["dataset"] == dataset]
            if not runs:
                continue
            rounds = sorted({int(k) for c in runs for k in c["accuracy"]})
            stats = [mean_std([c["accuracy"].get(str(k)) for c in runs]) for k in rounds]
            mean = np.array([s[0] for s in stats])
            std = np.nan_to_num(np.array([s[1] for s in stats]))
            x = np.asarray(rounds, np.float64)
            if x_axis == "MB sent":
                x = (
                    np.array(
                        [np.mean([bytes_until(c["bytes_sent"], k) for c in runs]) for k in rounds]
                    )
                    / 1e6
                )
            color = f"C{i}" if groups else None
            ax.plot(x, mean, marker="o", label=label, color=color)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=color)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_axis)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        if groups and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if utility:
        for ax, dataset in zip(axes[0][len(panels) :], table.datasets):
            _plot_utility(ax, table, results, dataset)
    if not groups:
        labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
        if labelled:
            labelled[-1].legend(fontsize=7)
    fig.suptitle(table.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_utility(ax: Any, table: Table, results: list[dict[str, Any]], dataset: str) -> None:
    """Final accuracy (mean ± std over seeds) vs the DP rows' noise multiplier z (0 for
    a cell without DP), each point labelled with the ε its cells spent."""
    points = []
    for row in (r for r in table.rows if r.group == DP_GROUP):
        cells_ = [r for r in results if r["run"] == row.run and r["dataset"] == dataset]
        if not cells_:
            continue
        dp = cells_[0]["config"]["fl"]["dp"]
        z = float(dp["noise_multiplier"]) if dp["clip_norm"] else 0.0
        acc = mean_std([accuracy_at(c["curves"]["accuracy"], None) for c in cells_])
        points.append((z, acc, _fmt_epsilon([final_epsilon(c["curves"]) for c in cells_])))
    points.sort()
    if points:
        z = np.array([p[0] for p in points])
        mean = np.array([p[1][0] for p in points])
        std = np.nan_to_num(np.array([p[1][1] for p in points]))
        ax.errorbar(z, mean, yerr=std, marker="o", capsize=3)
        for x, y, eps in zip(z, mean, (p[2] for p in points)):
            ax.annotate(f"ε = {eps}", (x, y), textcoords="offset points", xytext=(5, 6), fontsize=7)
        ax.margins(x=0.15, y=0.2)
    ax.set_title(f"{dataset}: DP-FedAvg utility (final accuracy)", fontsize=9)
    ax.set_xlabel("noise multiplier z")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------- JSON


def jsonable(value: Any) -> Any:
    """NaN/inf become null (JSON has none); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
