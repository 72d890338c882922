"""experiments/tables/: the grids, the cost model, the numbers read off the runs, the CLI,
and a tiny end-to-end table on a random model."""

from __future__ import annotations

import json
import math
import pathlib
from math import comb

import ml_collections
import numpy as np
import pytest

import experiments.tables
import fedsp
from experiments.tables import base, cli, cost, expand, grids, render, robustness, running
from fedsp import data
from fedsp.core import privacy
from fedsp.federated import faults
from tests.federated import fixtures


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(a, b):
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    return {k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)}


def _tiny_argv(table: str, cells: str, tmp_path, model_dir, *sets: str) -> list[str]:
    """The command line of ``table``'s ``cells`` at tiny scale, seed 0, under tmp_path,
    with the model and ``sets`` as ``--set`` overrides."""
    argv = ["--table", table, "--scale", "tiny", "--seeds", "0", "--cells", cells]
    argv += ["--workdir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")]
    for item in (f"model.path={model_dir}", *sets):
        argv += ["--set", item]
    return argv


def test_package_reexports_the_modules_public_names():
    # `from experiments.tables import X` and `experiments.tables.X` keep working: every
    # name is the module's own object, and every public name of a module is exported.
    modules = (base, cli, cost, expand, grids, render, robustness, running)
    for name in experiments.tables.__all__:
        owners = [m for m in modules if getattr(m, name, None) is getattr(experiments.tables, name)]
        assert owners, name
    public = {
        n
        for m in modules
        for n, v in vars(m).items()
        if not n.startswith("_")
        and getattr(v, "__module__", m.__name__) == m.__name__
        and not isinstance(v, type(m))
        and n != "annotations"
    }
    assert public <= set(experiments.tables.__all__), public - set(experiments.tables.__all__)


@pytest.mark.parametrize(
    "name,runs,datasets",
    [
        (
            "spear",
            ("spear", "feedback_sft", "grpo", "sft"),
            ("arithmetic", "gsm8k", "arc_challenge"),
        ),
        ("tpaw", ("spin", "tpaw"), ("gsm8k",)),
        (
            "aggregation",
            ("fedavg", "fedavg_prune", "advantage", "advantage_prune"),
            ("arithmetic",),
        ),
        ("settings", ("centralized", "fed_sft", "fed_selfplay"), ("arithmetic",)),
        (
            "robustness",
            (
                *(f"{a}_byz{p}" for a in ("mean", "trimmed", "krum") for p in (0, 10, 25)),
                "dp_z0.5",
                "dp_z1",
            ),
            ("arithmetic",),
        ),
    ],
)
def test_grid_has_every_run_dataset_seed(name, runs, datasets):
    grid = expand.cells(grids.TABLES[name])
    assert sorted(c.name for c in grid) == sorted(
        f"{r}-{d}-s{s}" for r in runs for d in datasets for s in (0, 1, 2)
    )
    for cell in grid:
        config = cell.config
        assert config.seed == cell.seed and config.task.name == cell.dataset
        assert config.model.path == ""  # the default SmolLM2-135M-Instruct asset
        assert config.algorithm.name in fedsp.algorithm_names()
        if cell.run != "centralized":
            assert (config.data.num_clients, config.data.partition, config.data.alpha) == (
                20 if name == "robustness" else 8,
                "dirichlet",
                1.0,
            )
        # Offline data only: ARC (test file only) is cut into disjoint train / eval parts.
        splits = (
            ("test[:75%]", "test[75%:]") if cell.dataset == "arc_challenge" else ("train", "test")
        )
        assert (config.task.train_split, config.task.eval_split) == splits


def test_spear_rows_read_the_right_runs():
    table = grids.TABLES["spear"]
    algorithms = {c.run: c.config.algorithm.name for c in expand.cells(table, seeds=[0])}
    assert algorithms == {
        "spear": "spear",
        "feedback_sft": "feedback_sft",
        "grpo": "grpo",
        "sft": "sft",
    }
    start = next(r for r in table.rows if r.key == "start")
    assert (start.run, start.round) == ("spear", 0)
    tpaw = grids.TABLES["tpaw"]
    assert [(r.label, r.run, r.round) for r in tpaw.rows] == [
        ("SFT start", "spin", 0),
        ("SPIN iter 1", "spin", 1),
        ("SPIN iter 2", "spin", 2),
        ("SPIN iter 3", "spin", 3),
        ("TPAW iter 1", "tpaw", 1),
        ("TPAW iter 2", "tpaw", 2),
        ("TPAW iter 3", "tpaw", 3),
    ]
    assert all(
        c.config.fl.rounds == 3 and c.config.eval.every == 1 for c in expand.cells(tpaw, seeds=[0])
    )


def test_aggregation_and_settings_cells_differ_only_in_what_the_row_names():
    agg = {c.run: c.config for c in expand.cells(grids.TABLES["aggregation"], seeds=[0])}
    assert _diff(agg["fedavg"], agg["advantage_prune"]) == {
        "fl.client_weighting",
        "fl.prune_threshold",
    }
    assert (
        agg["advantage_prune"].fl.client_weighting,
        agg["advantage_prune"].fl.prune_threshold,
        agg["fedavg"].fl.prune_threshold,
    ) == ("advantage", 0.0, None)
    settings = {c.run: c.config for c in expand.cells(grids.TABLES["settings"], seeds=[0])}
    assert _diff(settings["fed_sft"], settings["fed_selfplay"]) == {"algorithm.name"}
    central = settings["centralized"]
    assert (central.data.num_clients, central.fl.clients_per_round) == (1, 1)
    # The holder sees per round what the 4 sampled clients see together.
    fed = settings["fed_selfplay"]
    assert central.rollout.prompts_per_client == 4 * fed.rollout.prompts_per_client


def test_robustness_cells_differ_only_in_what_the_row_names():
    table = grids.TABLES["robustness"]
    configs = {c.run: c.config for c in expand.cells(table, seeds=[0])}
    clean = configs["mean_byz0"]
    for run, config in configs.items():
        aggregator, _, percent = run.partition("_byz")
        want = set()
        if run.startswith("dp_"):
            want = {"fl.dp.clip_norm", "fl.dp.noise_multiplier"}
            z = float(run.removeprefix("dp_z"))
            assert (config.fl.dp.clip_norm, config.fl.dp.noise_multiplier) == (0.65, z)
        else:
            name = {"mean": "mean", "trimmed": "trimmed_mean", "krum": "krum"}[aggregator]
            fraction = int(percent) / 100
            assert (config.fl.aggregator, config.fl.byzantine.fraction) == (name, fraction)
            want |= {"fl.aggregator"} if aggregator != "mean" else set()
            want |= {"fl.byzantine.fraction"} if fraction else set()
        assert _diff(clean, config) == want, run
    # Attack, defences and δ are set in every cell (inert where unused); the clean cell is
    # the settings table's federated gold-SFT cell with 20 clients, 8 a round, max_len 64.
    fed_sft = expand.cells(grids.TABLES["settings"], seeds=[0], only=["fed_sft"])[0].config
    assert _diff(fed_sft, clean) == {
        "data.num_clients",
        "fl.clients_per_round",
        "local.max_len",
        "fl.byzantine.scale",
        "fl.trim_fraction",
        "fl.krum_byzantine",
    }
    assert (clean.data.num_clients, clean.fl.clients_per_round, clean.local.max_len) == (20, 8, 64)
    assert (clean.fl.byzantine.attack, clean.fl.byzantine.scale) == ("sign_flip", 10.0)
    assert (clean.fl.trim_fraction, clean.fl.krum_byzantine, clean.fl.dp.delta) == (0.25, 2, 1e-5)
    assert clean.algorithm.name == "sft" and clean.fl.rounds == 6 and clean.eval.every == 1
    # Rows: the Byzantine rows by aggregator, then DP with z = 0 read off the clean run.
    assert [(r.group, r.label, r.run) for r in table.rows] == [
        *(
            (group, f"{p}%", f"{a}_byz{p}")
            for a, group in (
                ("mean", "mean (FedAvg)"),
                ("trimmed", "trimmed mean (β = 0.25)"),
                ("krum", "Krum (f = 2)"),
            )
            for p in (0, 10, 25)
        ),
        ("DP-FedAvg", "z = 0 (no DP: the mean row at 0%)", "mean_byz0"),
        ("DP-FedAvg", "z = 0.5", "dp_z0.5"),
        ("DP-FedAvg", "z = 1", "dp_z1"),
    ]
    assert table.target_run == "mean_byz0" and table.kind == "robustness"


def test_robustness_attackers_and_privacy_as_documented():
    # 10% and 25% of 20 clients are exactly 2 and 5 attackers, whatever the seed.
    for fraction, count in zip(robustness.BYZANTINE_FRACTIONS, (0, 2, 5)):
        for seed in (0, 1, 2):
            assert len(faults.byzantine_clients(20, fraction, seed)) == count
            config = robustness.robustness_config("arithmetic", seed, byzantine=fraction)
            assert render.byzantine_count(json.loads(config.to_json_best_effort())) == (count, 20)
    # (8 clients would realise 0 and 2; 10 clients 1 and 2.)
    assert [len(faults.byzantine_clients(n, f, 0)) for n in (8, 10) for f in (0.1, 0.25)] == [
        0,
        2,
        1,
        2,
    ]

    # A round samples 8 of 20 without replacement: hypergeometric attacker counts.
    def pmf(k, attackers):
        return comb(attackers, k) * comb(20 - attackers, 8 - k) / comb(20, 8)

    assert sum(k * pmf(k, 2) for k in range(3)) == pytest.approx(0.8)
    assert sum(k * pmf(k, 5) for k in range(6)) == pytest.approx(2.0)
    assert sum(pmf(k, 5) for k in range(3, 6)) == pytest.approx(0.30, abs=0.01)
    attackers = faults.byzantine_clients(20, 0.25, 0)
    met = [np.isin(data.sample_clients(20, 8, 0, r), attackers).sum() for r in range(1, 1001)]
    assert np.mean(met) == pytest.approx(2.0, abs=0.1)
    # sign_flip × 10 under FedAvg (lr 1): the expected step in honest steps.
    assert [(8 - 11 * a) / 8 for a in (0.8, 2.0)] == pytest.approx([-0.1, -1.75])
    # Defences sized for 2 attackers in 8: β·8 = 2 dropped at each end; n ≥ 2f + 3.
    assert math.floor(robustness.ROBUST_TRIM_FRACTION * 8) == 2
    assert 2 * robustness.ROBUST_KRUM_BYZANTINE + 3 <= 8
    # The ε the notes quote after 6 rounds, and the noise norm vs C.
    eps = [
        privacy.epsilon(6, num_clients=20, clients_per_round=8, noise_multiplier=z, delta=1e-5)
        for z in (0.5, 1.0)
    ]
    assert eps == pytest.approx([27.6, 10.3], abs=0.05)
    d = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))  # SmolLM2-135M, r8
    assert d * 4 == 9_768_960  # the adapter bytes the aggregation table's cells sent
    assert [z * 0.65 * math.sqrt(d) / 8 for z in (0.5, 1.0)] == pytest.approx(
        [63.5, 127.0], abs=0.1
    )


def test_arithmetic_cells_validate(monkeypatch):
    for name in grids.TABLES:
        grid = [c for c in expand.cells(grids.TABLES[name], seeds=[0]) if c.dataset == "arithmetic"]
        assert running.validation_problems(grid) == []
    # Without dp_accounting the DP cells are refused before anything runs.
    monkeypatch.setattr(running, "_dp_accounting_installed", lambda: False)
    grid = expand.cells(grids.TABLES["robustness"], seeds=[0], only=["dp_z", "mean_byz0"])
    assert running.validation_problems(grid) == [
        f"dp_z{z}-arithmetic-s0: fl.dp.clip_norm: the ε accounting needs dp_accounting "
        "(pip install -e '.[dp]')"
        for z in ("0.5", "1")
    ]


def _own_cells(name):
    """The cells table ``name`` runs in its own directory (not shared with another)."""
    grid = expand.cells(grids.TABLES[name])
    root = pathlib.Path("root")
    dirs = expand.cell_dirs(grid, root, seeds=(0, 1, 2), scale="cpu")
    return [c for c, d in zip(grid, dirs) if d == root / name / c.name]


def test_stated_budgets_match_the_cost_model():
    total = 0.0
    for table in grids.TABLES.values():
        hours = sum(cost.estimate_seconds(c.config) for c in _own_cells(table.name)) / 3600
        assert abs(hours - table.cpu_budget_h) <= 0.1 * table.cpu_budget_h, (table.name, hours)
        total += hours
    assert total < 12  # 8.1 h for the four paper tables, 3.3 h for robustness


def test_identical_cells_are_shared_across_tables():
    root = pathlib.Path("root")
    names = {}
    for name in grids.TABLES:
        grid = expand.cells(grids.TABLES[name], seeds=[1])
        for cell, d in zip(grid, expand.cell_dirs(grid, root, seeds=[1], scale="cpu")):
            names[f"{name}/{cell.name}"] = str(d.relative_to(root))
    assert names["settings/fed_selfplay-arithmetic-s1"] == "aggregation/fedavg-arithmetic-s1"
    assert names["spear/spear-arithmetic-s1"] == "aggregation/fedavg-arithmetic-s1"
    assert names["spear/sft-arithmetic-s1"] == "settings/fed_sft-arithmetic-s1"
    shared = {k for k, v in names.items() if k != v}
    assert shared == {
        "settings/fed_selfplay-arithmetic-s1",
        "spear/spear-arithmetic-s1",
        "spear/sft-arithmetic-s1",
    }
    # An override applies to every table, so shared cells stay shared and nothing else is.
    grid = expand.cells(grids.TABLES["spear"], seeds=[1], overrides={"local.lr": 1e-3})
    dirs = expand.cell_dirs(grid, root, seeds=[1], scale="cpu", overrides={"local.lr": 1e-3})
    assert sum(d.parts[1] != "spear" for d in dirs) == 2


def test_cost_model_on_the_benchmarked_round():
    # BENCHMARKS.md: SPEAR, 4 clients × 4 prompts × 16 tokens, one revision: rollout 10.4 s.
    config = base.cpu_config("arithmetic", 0)
    config.local.steps, config.fl.rounds, config.eval.every = 1, 1, 0
    rollout = 4 * 4 * 16 * 1.75 / cost.DECODE_TOKENS_S
    assert rollout == pytest.approx(10.4, rel=0.1)
    train = 4 * 1 * 4 * 160 / cost.TRAIN_TOKENS_S
    evals = 2 * 32 * 16 / cost.DECODE_TOKENS_S
    assert cost.estimate_seconds(config) == pytest.approx(
        cost.STARTUP_S + rollout + train + cost.ROUND_OVERHEAD_S + evals
    )


def test_mean_std_is_numpy_sample_std():
    values = [0.25, 0.5, 0.375]
    mean, std, n = render.mean_std(values)
    assert (mean, n) == (pytest.approx(np.mean(values)), 3)
    assert std == pytest.approx(np.std(values, ddof=1))
    assert render.mean_std([0.5, None, 0.25])[:2] == (
        pytest.approx(0.375),
        pytest.approx(np.std([0.5, 0.25], ddof=1)),
    )
    mean, std, n = render.mean_std([0.5])
    assert mean == 0.5 and math.isnan(std) and n == 1
    assert render.mean_std([None])[2] == 0
    assert render._fmt(render.mean_std(values)) == "0.375 ± 0.125"
    assert render._fmt(render.mean_std([0.5, None]), total=2) == "0.500 (1/2)"


def test_rounds_to_target_and_bytes_from_a_known_curve():
    curve = {"0": 0.1, "1": 0.2, "2": 0.35, "3": 0.3, "4": 0.5}
    assert render.rounds_to_target(curve, 0.3) == 2
    assert render.rounds_to_target(curve, 0.35) == 2
    assert render.rounds_to_target(curve, 0.1) == 0
    assert render.rounds_to_target(curve, 0.51) is None
    # Rounds evaluated every other round: the first evaluated round at or above target.
    assert render.rounds_to_target({"0": 0.0, "2": 0.2, "10": 0.4}, 0.3) == 10
    sent = {"0": 0, "1": 100, "2": 50, "3": 100}
    assert render.bytes_until(sent, 2) == 150 and render.bytes_until(sent, 0) == 0


def _result(run, seed, accuracy, *, sent=100, saved=0, num_clients=8, text_leaves=0):
    rounds = sorted(accuracy, key=int)
    return {
        "run": run,
        "dataset": "arithmetic",
        "seed": seed,
        "curves": {
            "accuracy": accuracy,
            "bytes_sent": {r: (0 if r == "0" else sent) for r in rounds},
            "bytes_saved": dict.fromkeys(rounds, saved),
        },
        "summary": {"bytes_sent": sent * (len(rounds) - 1), "bytes_saved": saved},
        "audit": {"server_calls": len(rounds) - 1, "text_leaves": text_leaves},
        "config": {"data": {"num_clients": num_clients}},
    }


def test_collect_aggregation_numbers():
    table = grids.TABLES["aggregation"]
    results = []
    for seed in (0, 1):
        results.append(_result("fedavg", seed, {"0": 0.1, "1": 0.2, "2": 0.3, "3": 0.5}))
        results.append(_result("advantage", seed, {"0": 0.1, "1": 0.35, "2": 0.4, "3": 0.4}))
        results.append(
            _result(
                "fedavg_prune", seed, {"0": 0.1, "1": 0.1, "2": 0.1, "3": 0.2}, sent=50, saved=50
            )
        )
        results.append(_result("advantage_prune", seed, {"0": 0.1, "1": 0.3, "2": 0.3, "3": 0.3}))
    numbers = render.collect(table, results)
    # target = round-0 + 0.5 × (best − round-0) of FedAvg = 0.1 + 0.5 × 0.4 = 0.3
    assert numbers["targets"]["arithmetic"]["target"] == pytest.approx(0.3)
    rows = numbers["rows"]
    assert rows["fedavg"]["arithmetic"]["rounds_to_target"] == {0: 2, 1: 2}
    assert rows["advantage"]["arithmetic"]["rounds_to_target"] == {0: 1, 1: 1}
    assert rows["fedavg_prune"]["arithmetic"]["rounds_to_target"] == {0: None, 1: None}
    assert rows["fedavg_prune"]["arithmetic"]["rounds_to_target_stat"][2] == 0
    assert rows["advantage"]["arithmetic"]["bytes_to_target"] == {0: 100, 1: 100}
    assert rows["fedavg"]["arithmetic"]["bytes_to_target"] == {0: 200, 1: 200}
    assert rows["fedavg_prune"]["arithmetic"]["bytes_saved_stat"][0] == 50
    assert rows["fedavg"]["arithmetic"]["mean"] == pytest.approx(0.5)
    assert render.collect(table, results, target=0.45)["rows"]["fedavg"]["arithmetic"][
        "rounds_to_target"
    ] == {0: 3, 1: 3}
    md = render.render_markdown(
        table,
        numbers,
        {
            "scale": "cpu",
            "estimated_s": 3600.0,
            "measured_s": 0.0,
            "command": "x",
            "rounds_s": 5400.0,
            "commit": "abc123",
        },
    )
    assert "| advantage-weighted | 0.400 ± 0.000 | 1.0 ± 0.0 | 0.00 ± 0.00 |" in md
    assert (
        "over every process that ran them: 1.50 h. Table written by a process started at commit abc123."
        in md
    )
    assert "| FedAvg + pruning | 0.200 ± 0.000 | — |" in md


def _robust_result(run, seed, accuracy, attackers, epsilon=None):
    r = _result(run, seed, accuracy, num_clients=20)
    rounds = [k for k in accuracy if k != "0"]
    r["curves"]["byzantine"] = dict(zip(rounds, attackers))
    r["curves"]["epsilon"] = epsilon or {}
    fraction = {"0": 0.0, "10": 0.1, "25": 0.25}[run.partition("_byz")[2] or "0"]
    noise = float(run.removeprefix("dp_z")) if run.startswith("dp_") else 0.0
    r["config"]["fl"] = {
        "byzantine": {"fraction": fraction},
        "dp": {"clip_norm": 0.65 if noise else 0.0, "noise_multiplier": noise},
    }
    return r


def test_collect_and_render_robustness_numbers(tmp_path):
    table = grids.TABLES["robustness"]
    eps = {"1": 9.78, "2": 15.0, "3": 18.5}
    results = []
    for seed in (0, 1):
        results += [
            _robust_result("mean_byz0", seed, {"0": 0.1, "1": 0.2, "2": 0.3, "3": 0.5}, [0, 0, 0]),
            _robust_result(
                "mean_byz25",
                seed,
                {"0": 0.1, "1": 0.0, "2": 0.0, "3": 0.0},
                [[2, 3, 1], [1, 2, 3]][seed],
            ),
            _robust_result(
                "krum_byz25",
                seed,
                [
                    {"0": 0.1, "1": 0.3, "2": 0.3, "3": 0.4},
                    {"0": 0.1, "1": 0.2, "2": 0.4, "3": 0.4},
                ][seed],
                [[2, 2, 2], [3, 3, 3]][seed],
            ),
            _robust_result(
                "dp_z0.5", seed, {"0": 0.1, "1": 0.0, "2": 0.1, "3": 0.0}, [0, 0, 0], eps
            ),
        ]
    numbers = render.collect(table, results)
    # target = round-0 + 0.5 × (best − round-0) of the clean mean run = 0.1 + 0.5 × 0.4
    assert numbers["targets"]["arithmetic"]["target"] == pytest.approx(0.3)
    rows = numbers["rows"]
    krum = rows["krum_byz25"]["arithmetic"]
    assert krum["rounds_to_target"] == {0: 1, 1: 2}
    assert krum["attackers_per_round"] == {0: 2.0, 1: 3.0}
    assert krum["byzantine_clients"] == (5, 20) and krum["epsilon"] == {0: math.inf, 1: math.inf}
    assert rows["dp_z0.5"]["arithmetic"]["epsilon"] == {0: 18.5, 1: 18.5}
    assert rows["dp_z0"]["arithmetic"]["mean"] == pytest.approx(0.5)  # the clean mean run
    md = render.render_markdown(
        table, numbers, {"scale": "cpu", "estimated_s": 3600.0, "measured_s": 0.0, "command": "x"}
    )
    for line in (
        "| mean (FedAvg) | 0% (0 of 20 clients) | 0.500 ± 0.000 | 2.0 ± 0.0 | 0.00 ± 0.00 |",
        "| mean (FedAvg) | 25% (5 of 20 clients) | 0.000 ± 0.000 | — | 2.00 ± 0.00 |",
        "| trimmed mean (β = 0.25) | 10% | — | — | — |",
        "| Krum (f = 2) | 25% (5 of 20 clients) | 0.400 ± 0.000 | 1.5 ± 0.7 | 2.50 ± 0.71 |",
        "| z = 0 (no DP: the mean row at 0%) | ∞ | 0.500 ± 0.000 | 2.0 ± 0.0 |",
        "| z = 0.5 | 18.50 | 0.000 ± 0.000 | — |",
        "| z = 1 | — | — | — |",
    ):
        assert line in md.splitlines(), line
    assert "Stated CPU budget (2 cores, CPU scale, 3 seeds): 3.3 h." in md
    assert render._fmt_epsilon([18.5, 19.5]) == "19.00 ± 0.71"
    render.plot_curves(table, results, tmp_path / "robustness.png")
    assert (tmp_path / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_curves_counts_attackers_and_reads_epsilon(tmp_path):
    records = [
        {"round": 0, "eval/accuracy": 0.0},
        {"round": 1, "byzantine": [3, 7], "dp/epsilon": 9.7, "eval/accuracy": 0.1},
        {"round": 2, "byzantine": [], "dp/epsilon": None, "eval/accuracy": 0.2},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    curves = running.read_curves(tmp_path)
    assert curves["byzantine"] == {"1": 2, "2": 0} and curves["epsilon"] == {"1": 9.7, "2": None}
    assert render.attackers_per_round(curves) == 1.0
    assert render.final_epsilon(curves) == math.inf  # null: no noise
    assert render.final_epsilon(dict(curves, epsilon={"1": 9.7, "2": 12.0})) == 12.0
    assert render.final_epsilon({"accuracy": {}}) == math.inf  # no DP at all
    assert render.attackers_per_round({"accuracy": {}}) is None


def test_raw_text_flag_comes_from_the_audit_and_the_pooling():
    assert render.raw_text_left_client(_result("fed_sft", 0, {"0": 0.0})) is False
    assert render.raw_text_left_client(_result("x", 0, {"0": 0.0}, text_leaves=1)) is True
    assert render.raw_text_left_client(_result("centralized", 0, {"0": 0.0}, num_clients=1))
    no_audit = dict(_result("fed_sft", 0, {"0": 0.0}), audit=None)
    assert render.raw_text_left_client(no_audit) is None


def test_server_audit_types_every_leaf():
    audit = running.ServerAudit()
    step = audit.hooks.server_step(lambda *inputs: "stepped")
    assert step({"w": np.ones(2)}, np.float32(1.0), {"n": np.zeros(2)}) == "stepped"
    step({"w": np.ones(2), "feedback": "the answer is 4"}, 0.0, {})
    assert audit.calls == 2 and audit.text_leaves == 1
    assert audit.leaf_types == {"ndarray": 3, "float32": 1, "str": 1, "float": 1}


@pytest.mark.parametrize(
    "argv,field",
    [
        (["--table", "nope"], "--table"),
        (["--table", "spear", "--scale", "huge"], "--scale"),
        (["--table", "spear", "--seeds", "0,x"], "--seeds"),
        (["--table", "spear", "--set", "fl.roundz=3", "--dry-run"], "fl.roundz"),
        (["--table", "spear", "--set", "fl.rounds", "--dry-run"], "--set"),
        (["--table", "spear", "--cells", "zzz", "--dry-run"], "--cells"),
    ],
)
def test_bad_options_name_the_field(argv, field, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    assert field in capsys.readouterr().err


def test_dry_run_prints_cells_and_configs(capsys):
    assert (
        cli.main(
            [
                "--table",
                "aggregation",
                "--seeds",
                "0",
                "--cells",
                "advantage",
                "--set",
                "fl.rounds=2",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("table aggregation: 2 cells, scale cpu")
    assert "== advantage-arithmetic-s0" in out and "== advantage_prune-arithmetic-s0" in out
    assert "fedavg-" not in out and '"rounds": 2' in out


def test_full_scale_configs_for_every_row(capsys):
    for table in grids.TABLES.values():
        for cell in expand.cells(table, seeds=[0], scale="full"):
            assert cell.config.model.path in ("meta-llama/Llama-3.2-3B", "Qwen/Qwen2.5-1.5B")
            assert cell.config.model.dtype == "bfloat16"
    tpaw = expand.cells(grids.TABLES["tpaw"], seeds=[0], scale="full")
    assert {(c.config.data.num_clients, c.config.fl.clients_per_round) for c in tpaw} == {(8, 8)}
    spear = {c.name: c.config for c in expand.cells(grids.TABLES["spear"], seeds=[0], scale="full")}
    assert spear["grpo-arc_challenge-s0"].algorithm.name == "grpo"
    assert spear["spear-arc_challenge-s0"].data.num_clients == 50
    assert (
        spear["spear-arc_challenge-s0"].task.train_split,
        spear["spear-arc_challenge-s0"].task.eval_split,
    ) == ("train", "test")
    settings = {
        c.run: c.config for c in expand.cells(grids.TABLES["settings"], seeds=[1], scale="full")
    }
    assert settings["centralized"].data.num_clients == 1 and settings["centralized"].seed == 1
    robust = {
        c.run: c.config for c in expand.cells(grids.TABLES["robustness"], seeds=[0], scale="full")
    }
    cpu = {c.run: c.config for c in expand.cells(grids.TABLES["robustness"], seeds=[0])}
    for run, config in robust.items():
        assert (config.data.num_clients, config.fl.clients_per_round) == (50, 10)
        assert config.algorithm.name == "sft" and config.eval.every == 1
        for field in ("aggregator", "trim_fraction", "krum_byzantine", "byzantine", "dp"):
            full_value, cpu_value = config.fl[field], cpu[run].fl[field]
            if isinstance(cpu_value, ml_collections.ConfigDict):
                full_value, cpu_value = full_value.to_dict(), cpu_value.to_dict()
            assert full_value == cpu_value, (run, field)
    assert [len(faults.byzantine_clients(50, f, 0)) for f in (0.1, 0.25)] == [5, 12]
    assert cli.main(["--table", "tpaw", "--scale", "full", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen2.5-1.5B" in out and "== tpaw-gsm8k-s2" in out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.mark.slow
def test_tiny_table_writes_outputs_and_skips_finished_cells(model_dir, tmp_path, monkeypatch):
    argv = _tiny_argv("settings", "centralized,fed_sft,fed_selfplay", tmp_path, model_dir)
    assert cli.main(argv) == 0
    results = tmp_path / "results"
    md = (results / "settings.md").read_text()
    assert "| centralized (SPEAR, pooled data) |" in md and "| yes |" in md
    assert "| federated gold SFT |" in md and "| no |" in md
    assert (results / "settings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((results / "settings.json").read_text())
    assert sorted(c["run"] for c in data["cells"]) == ["centralized", "fed_selfplay", "fed_sft"]
    # The federated SPEAR cell is the aggregation table's FedAvg cell: it ran there, once.
    where = {
        "centralized": "settings/centralized",
        "fed_sft": "settings/fed_sft",
        "fed_selfplay": "aggregation/fedavg",
    }
    assert data["meta"]["shared_cells"] == {
        "fed_selfplay-arithmetic-s0": "aggregation/fedavg-arithmetic-s0"
    }
    assert "1 of its cells are another table's" in md
    assert not (tmp_path / "runs" / "tiny" / "settings" / "fed_selfplay-arithmetic-s0").exists()
    for cell in data["cells"]:
        summary = json.loads(
            (
                tmp_path / "runs" / "tiny" / f"{where[cell['run']]}-arithmetic-s0" / "summary.json"
            ).read_text()
        )
        assert cell["curves"]["accuracy"] == summary["accuracy_by_round"]
        assert (
            data["numbers"]["rows"][cell["run"]]["arithmetic"]["per_seed"]["0"]
            == summary["final_accuracy"]
        )
    fed = next(c for c in data["cells"] if c["run"] == "fed_sft")
    assert fed["audit"]["server_calls"] == 2 and fed["audit"]["text_leaves"] == 0
    # The budget line adds up every round's wall time, read back from metrics.jsonl.
    assert sorted(fed["curves"]["time_s"]) == ["1", "2"]  # round 0 is evaluation only
    assert data["meta"]["rounds_s"] == pytest.approx(
        sum(sum(c["curves"]["time_s"].values()) for c in data["cells"])
    )
    assert data["meta"]["rounds_s"] > 0 and data["meta"]["commit"]
    commit = running.git_commit() or "unknown"
    assert all(c["commits"] == [commit] for c in data["cells"])
    assert f"its cells ran at commit {commit} (all 3 cells)" in md

    # Re-running skips finished cells: the loop must not be entered again.
    def fail(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(fedsp, "run", fail)
    (results / "settings.md").unlink()
    assert cli.main(argv) == 0
    assert (results / "settings.md").read_text() == md
    # A finished cell whose config changed is refused, naming the field.
    with pytest.raises(ValueError, match=r"local\.lr"):
        cli.main([*argv, "--set", "local.lr=0.001"])


@pytest.mark.slow
def test_tiny_robustness_table_runs_and_renders(model_dir, tmp_path):
    # Three of its cells: the clean mean run (the target and the z = 0 row), Krum under
    # attack and DP-FedAvg. 4 clients, all sampled, so 25% is one attacker every round.
    argv = _tiny_argv(
        "robustness",
        "mean_byz0,krum_byz25,dp_z0.5",
        tmp_path,
        model_dir,
        "data.num_clients=4",
        "fl.clients_per_round=4",
    )
    assert cli.main(argv) == 0
    results = tmp_path / "results"
    md = (results / "robustness.md").read_text()
    data_ = json.loads((results / "robustness.json").read_text())
    rows = data_["numbers"]["rows"]
    assert rows["krum_byz25"]["arithmetic"]["attackers_per_round"] == {"0": 1.0}
    assert rows["mean_byz0"]["arithmetic"]["attackers_per_round"] == {"0": 0.0}
    krum = next(line for line in md.splitlines() if line.startswith("| Krum (f = 2) | 25%"))
    assert krum.startswith("| Krum (f = 2) | 25% (1 of 4 clients) | ") and krum.endswith(
        " | 1.00 |"
    )
    # ε after 2 rounds of 4 of 4 clients at z = 0.5, as the accountant gives it.
    eps = privacy.epsilon(2, num_clients=4, clients_per_round=4, noise_multiplier=0.5, delta=1e-5)
    assert rows["dp_z0.5"]["arithmetic"]["epsilon"]["0"] == pytest.approx(eps)
    assert f"| z = 0.5 | {eps:.2f} | " in md
    assert "| z = 0 (no DP: the mean row at 0%) | ∞ | " in md
    assert rows["dp_z0"]["arithmetic"]["per_seed"] == rows["mean_byz0"]["arithmetic"]["per_seed"]
    assert (results / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The records name the run's one attacker in every round; the z = 0 row ran no cell.
    workdir = tmp_path / "runs" / "tiny" / "robustness"
    attacker = faults.byzantine_clients(4, 0.25, 0).tolist()
    records = (workdir / "krum_byz25-arithmetic-s0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["byzantine"] for r in records[1:]] == [attacker, attacker]
    assert sorted(p.name for p in workdir.iterdir()) == [
        "dp_z0.5-arithmetic-s0",
        "krum_byz25-arithmetic-s0",
        "mean_byz0-arithmetic-s0",
    ]


def test_update_norms_measures_what_the_server_receives(model_dir):
    # 2 clients, one of them an attacker sending θ_r back (a "scale" attack with s = 0).
    config = robustness.robustness_config("arithmetic", 0, byzantine=0.5)
    expand.tiny_scale(config, str(model_dir))
    config.fl.byzantine.attack, config.fl.byzantine.scale = "scale", 0.0
    (norms,) = running.update_norms(config)
    clients = data.sample_clients(2, 2, 0, 1)
    attacked = np.isin(clients, faults.byzantine_clients(2, 0.5, 0))
    assert [n == 0.0 for n in norms] == attacked.tolist() and max(norms) > 0


def test_speedup_line_reports_what_was_measured():
    rows = {
        "fedavg": {"a": {"rounds_to_target_stat": (5.0, 0.0, 3)}},
        "advantage": {"a": {"rounds_to_target_stat": (3.0, 0.0, 3)}},
    }
    assert "3.00 vs 5.00" in render._speedup(rows, "a") and "40% fewer" in render._speedup(
        rows, "a"
    )
    rows["advantage"]["a"]["rounds_to_target_stat"] = (6.0, 0.0, 3)
    assert "20% more" in render._speedup(rows, "a")
    rows["advantage"]["a"]["rounds_to_target_stat"] = (math.nan, math.nan, 0)
    assert "not comparable" in render._speedup(rows, "a")


def test_all_tables_dry_run(capsys):
    assert cli.main(["--table", "all", "--seeds", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("table ")] == [
        f"table {name}" for name in grids.TABLES
    ]


def test_partial_cell_resumes_in_its_directory_and_audits_add_up(tmp_path, monkeypatch):
    cell = expand.cells(grids.TABLES["settings"], seeds=[0], only=["fed_sft"])[0]
    workdir = tmp_path / cell.name
    calls = []

    def fake_run(config, directory, *, hooks):
        # Stands in for the loop: two server steps through the hook, then a summary.
        calls.append(directory)
        step = hooks.server_step(lambda *inputs: None)
        for _ in range(2):
            step({"w": np.ones(2)}, np.float32(1.0), {"n": np.zeros(3)})
        if len(calls) == 1:
            raise KeyboardInterrupt  # the first attempt dies mid-run
        (directory / "summary.json").write_text(json.dumps({"final_accuracy": 0.5}))
        (directory / "config.json").write_text(config.to_json_best_effort())
        return {"final_accuracy": 0.5}

    monkeypatch.setattr(fedsp, "run", fake_run)
    workdir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        running.run_cell(cell, workdir)
    assert running.run_cell(cell, workdir) == {"final_accuracy": 0.5}
    assert calls == [workdir, workdir]
    audit = json.loads((workdir / "server_audit.json").read_text())
    assert audit == {
        "server_calls": 4,
        "leaf_types": {"ndarray": 8, "float32": 4},
        "text_leaves": 0,
    }
    # Both attempts ran at this checkout's commit: recorded once.
    assert running.cell_commits(workdir) == [running.git_commit() or "unknown"]
    # Finished: a third call reads the summary without running.
    assert running.run_cell(cell, workdir) == {"final_accuracy": 0.5} and len(calls) == 2


def test_a_finished_cell_predating_an_execution_field_still_matches(tmp_path):
    """A cell saved before ``rollout.reuse_cache`` existed matches the config that has it
    at its default (it computes the same); any other difference, or the field set to
    the non-default value, is a different config."""
    cell = expand.cells(grids.TABLES["settings"], seeds=[0], only=["fed_sft"])[0]
    workdir = tmp_path / cell.name
    workdir.mkdir()
    saved = json.loads(cell.config.to_json_best_effort())
    assert saved["rollout"].pop("reuse_cache") is True
    (workdir / "config.json").write_text(json.dumps(saved))
    (workdir / "summary.json").write_text(json.dumps({"final_accuracy": 0.25}))
    assert running.run_cell(cell, workdir) == {"final_accuracy": 0.25}
    for field, value in (("reuse_cache", False), ("max_new_tokens", 7)):
        changed = dict(saved, rollout=dict(saved["rollout"], **{field: value}))
        (workdir / "config.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match=f"rollout.{field}"):
            running.run_cell(cell, workdir)
