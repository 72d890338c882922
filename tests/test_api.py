"""The top-level API: ``init_run`` / ``run_round`` give ``run``'s rounds bit for bit, a
user's registered algorithm runs through ``run``, and the package's layers import only
downwards."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import re

import jax
import numpy as np
import pytest

import fedsp
from fedsp import data as data_lib
from fedsp.model import from_pretrained
from tests.federated import fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fixtures.save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def _spear_config(model_dir, **overrides):
    return fixtures.tiny_config(
        model_dir,
        fl__rounds=2,
        fl__server_optimizer="fedadam",
        fl__server_lr=0.1,
        fl__client_weighting="advantage",
        data__limit=32,
        rollout__prompts_per_client=2,
        rollout__max_new_tokens=4,
        algorithm__max_revisions=1,
        local__steps=2,
        local__batch_size=2,
        local__max_len=128,
        local__lr=1e-2,
        local__warmup_ratio=0.0,
        eval__every=1,
        **overrides,
    )


class ServerOutputs:
    """A server-step hook keeping every step's new adapters."""

    def __init__(self):
        self.params = []

    def __call__(self, step):
        def kept(*inputs):
            out = step(*inputs)
            self.params.append(out[0])
            return out

        return kept


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _strip(record):
    return {k: v for k, v in json.loads(json.dumps(record)).items() if not k.startswith("time")}


@pytest.mark.slow  # compiles the sampler, the train step and the evaluation twice
def test_run_round_gives_the_rounds_of_run_bit_for_bit(model_dir, tmp_path, monkeypatch):
    """Real SPEAR (sampler, revisions, packing, jitted steps, FedAdam with advantage
    weights) with an in-memory model through init_run / run_round, against fedsp.run
    loading the same model from disk: identical adapters and records every round."""
    monkeypatch.setattr(
        data_lib, "get_feedback", lambda name, task, **kw: fixtures.CoinFlipUser(task)
    )
    config = _spear_config(model_dir)
    outputs = ServerOutputs()
    summary = fedsp.run(config, tmp_path / "run", hooks=fedsp.RoundHooks(server_step=outputs))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]

    model, tokenizer = from_pretrained(model_dir)
    state = fedsp.init_run(config, model=model, tokenizer=tokenizer)
    assert model.lora_config is None  # the caller's model is left without adapters
    assert _strip({"round": 0, **fedsp.evaluate(state)}) == _strip(logged[0])
    for rnd in (1, 2):
        state, record = fedsp.run_round(state)
        assert state.round == rnd and state.metrics_history[-1] is record
        assert _strip(record) == _strip(logged[rnd])
        for a, b in zip(_leaves(state.params), _leaves(outputs.params[rnd - 1])):
            np.testing.assert_array_equal(a, b)
    # Not vacuous: clients won and trained, and the adapters moved in both rounds.
    assert all(r["collect/rollout/wins"] > 0 and r["client/trained"] > 0 for r in logged[1:])
    assert summary["final_accuracy"] == logged[2]["eval/accuracy"]
    assert not np.array_equal(_leaves(outputs.params[0])[0], _leaves(outputs.params[1])[0])
    with pytest.raises(ValueError, match=r"fl\.rounds = 2 rounds"):
        fedsp.run_round(state)


def test_init_run_without_workdir_writes_nothing(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = fixtures.tiny_config(model_dir, fl__rounds=1)
    state = fedsp.init_run(config, algorithm=fixtures.StandInAlgorithm())
    state, record = fedsp.run_round(state)
    assert record["round"] == 1 and state.run.workdir is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="no workdir"):
        fedsp.save_checkpoint(state)


def test_a_replaced_server_step_and_the_uploads_hook(model_dir):
    config = fixtures.tiny_config(model_dir, fl__rounds=1)
    state = fedsp.init_run(config, algorithm=fixtures.StandInAlgorithm())
    seen = []

    def keep_theta(default):
        def step(params, opt_state, uploads):
            _, _, diag = default(params, opt_state, uploads)
            return params, opt_state, diag

        return step

    hooks = fedsp.RoundHooks(
        on_uploads=lambda rnd, uploads: seen.append((rnd, uploads)), server_step=keep_theta
    )
    new, record = fedsp.run_round(state, hooks=hooks)
    for a, b in zip(_leaves(new.params), _leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    [(rnd, uploads)] = seen
    assert rnd == 1 and uploads.clients.tolist() == record["clients"]
    assert jax.tree.leaves(uploads.params)[0].shape[0] == config.fl.clients_per_round

    def broken(default):
        return lambda params, opt_state, uploads: (params, opt_state, {"weights": 0})

    with pytest.raises(ValueError, match=r"diagnostics lack \['keep', 'finite', 'applied'\]"):
        fedsp.run_round(state, hooks=fedsp.RoundHooks(server_step=broken))


def test_in_memory_model_must_match_the_config(model_dir):
    from flax import nnx

    from fedsp.model.lora import LoRAConfig, apply_lora

    config = fixtures.tiny_config(model_dir, fl__rounds=1)
    model, tokenizer = from_pretrained(model_dir)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        fedsp.init_run(config, model=model)
    apply_lora(model, LoRAConfig(rank=3, alpha=6.0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"differ from config\.model\.lora"):
        fedsp.init_run(config, model=model, tokenizer=tokenizer)


def _readme_algorithm() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- user-algorithm[^>]*-->\n```python\n(.*?)```", readme, re.S)
    assert match, "README.md lost its user-algorithm example"
    return match.group(1)


def test_the_readme_algorithm_is_short_and_runs_through_run(model_dir, tmp_path, monkeypatch):
    code = _readme_algorithm()
    body = [
        line
        for line in code.splitlines()
        if line.strip() and not line.startswith(("import ", "from "))
    ]
    assert len(body) <= 30
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # registers "rejection_sampling"
    assert "rejection_sampling" in fedsp.algorithm_names()
    monkeypatch.setattr(
        data_lib, "get_feedback", lambda name, task, **kw: fixtures.CoinFlipUser(task)
    )
    config = fixtures.tiny_config(
        model_dir,
        fl__rounds=1,
        algorithm__name="rejection_sampling",
        data__limit=16,
        rollout__prompts_per_client=2,
        rollout__max_new_tokens=4,
        local__steps=1,
        local__batch_size=2,
        local__max_len=96,
    )
    outputs = ServerOutputs()
    summary = fedsp.run(config, tmp_path / "run", hooks=fedsp.RoundHooks(server_step=outputs))
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[1])
    # Some sampled replies were judged correct, those clients trained, and the server moved.
    assert record["collect/wins"] > 0 and record["client/trained"] > 0
    assert record["loss"] is not None and summary["rounds"] == 1
    start = fedsp.init_run(config).params
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(outputs.params[0]), _leaves(start)))


def test_registry_protects_builtins_and_lists_user_algorithms():
    fedsp.register_algorithm("test_api_echo", lambda config: None)
    fedsp.register_algorithm("test_api_echo", lambda config: "again")  # a re-run cell
    assert fedsp.get_algorithm("test_api_echo", None) == "again"
    assert fedsp.algorithm_names()[:7] == (
        "spear",
        "feedback_sft",
        "sft",
        "grpo",
        "spin",
        "tpaw",
        "dpo",
    )
    with pytest.raises(ValueError, match="built-in algorithm"):
        fedsp.register_algorithm("spear", lambda config: None)
    with pytest.raises(ValueError, match="unknown algorithm 'nope'"):
        fedsp.get_algorithm("nope", None)


def test_stateful_runs_accept_only_their_newest_state(model_dir):
    config = fixtures.tiny_config(
        model_dir,
        fl__rounds=2,
        fl__clients_per_round=2,
        algorithm__name="tpaw",
        rollout__prompts_per_client=2,
        rollout__max_new_tokens=4,
        data__limit=16,
        local__steps=1,
        local__batch_size=2,
        local__max_len=96,
        eval__examples=2,
        eval__max_new_tokens=2,
    )
    start = fedsp.init_run(config)
    assert start.run.pool is not None and start.run.pool.directory is None  # in memory
    assert start.run.pool.rounds == (0,)
    after, record = fedsp.run_round(start)
    assert record["pool/rounds"] == [0] and start.run.pool.rounds == (0, 1)
    with pytest.raises(ValueError, match="consumes its state"):
        fedsp.run_round(start)
    fedsp.run_round(after)


def test_top_level_exports_resolve():
    assert fedsp.__all__ == sorted(fedsp._EXPORTS)
    for name in fedsp.__all__:
        assert getattr(fedsp, name) is not None, name
    assert fedsp.run is fedsp.runner.run and fedsp.validate_config is fedsp.config.validate
    with pytest.raises(AttributeError):
        fedsp.no_such_name  # noqa: B018


# Each package layer may import only the layers before it (and itself).
LAYERS = (
    (
        "fedsp.core",
        "fedsp.hostalloc",
        "fedsp.assets",
        "fedsp.distributed",
        "fedsp.compilation_cache",
        "fedsp.executables",
        "fedsp.progress",
    ),
    ("fedsp.model",),
    ("fedsp.data",),
    ("fedsp.eval", "fedsp.checkpoint"),
    ("fedsp.selfplay",),
    ("fedsp.federated",),
    ("fedsp.config",),
    ("fedsp.run_setup", "fedsp.run_checkpoint", "fedsp.runner"),
    ("fedsp.plan", "fedsp.flower"),
)


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer")


def test_layers_import_only_downwards():
    bad = []
    for path in sorted((REPO / "fedsp").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if module == "fedsp":
            continue
        own = _layer(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            bad.extend(
                f"{module} imports {name}"
                for name in names
                if name.startswith("fedsp.") and _layer(name) > own
            )
    assert not bad, bad


def test_dataclass_state_keeps_its_run():
    # dataclasses.replace on a RunState keeps the run context (run_round relies on it).
    state = fedsp.RunState(round=0, params={}, opt_state=(), rng=None, run="ctx")  # type: ignore[arg-type]
    assert dataclasses.replace(state, round=1).run == "ctx"
