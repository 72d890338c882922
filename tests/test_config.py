"""`fedsp.config.validate`: every bad field is reported by name, with its choices."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fedsp import config as config_lib
from fedsp import data, run_setup
from fedsp.config import default_config


def _error(**changes) -> str:
    config = default_config()
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    with pytest.raises(ValueError) as info:
        config_lib.validate(config)
    return str(info.value)


def test_default_config_is_valid():
    config_lib.validate(default_config())


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"task__name": "mnist"}, r"task.name: got 'mnist'; choose one of \(.*'arithmetic'"),
        ({"algorithm__name": "ppo"}, r"algorithm.name: got 'ppo'; choose one of \('spear'"),
        (
            {"fl__server_optimizer": "sgd"},
            r"fl.server_optimizer: got 'sgd'; choose one of \('fedavg'",
        ),
        (
            {"fl__backend": "tpu"},
            r"fl.backend: got 'tpu'; choose one of \('vmap', 'pmap', 'loop'\)",
        ),
        ({"fl__client_weighting": "loss"}, r"fl.client_weighting: got 'loss'; choose one of"),
        ({"fl__clients_at_once": -1}, r"fl.clients_at_once: must be >= 0, got -1"),
        (
            {"fl__backend": "pmap", "fl__clients_at_once": 2},
            r"fl.clients_at_once: the pmap backend places clients itself",
        ),
        ({"algorithm__feedback": "gold"}, r"algorithm.feedback: got 'gold'"),
        (
            {"data__partition": "shards"},
            r"data.partition: got 'shards'; choose one of \('iid', 'dirichlet'\)",
        ),
        ({"fl__rounds": 0}, r"fl.rounds: must be >= 1, got 0"),
        ({"fl__clients_per_round": 5}, r"fl.clients_per_round: 5 > data.num_clients = 4"),
        (
            {"fl__sampling": "bernoulli"},
            r"fl.sampling: got 'bernoulli'; choose one of \('fixed', 'poisson'\)",
        ),
        (
            {"fl__straggler__deadline": -1.0},
            r"fl.straggler.deadline: must be a finite number in \[0, inf\), got -1.0",
        ),
        ({"fl__straggler__speed_spread": float("inf")}, r"fl.straggler.speed_spread: must be"),
        ({"fl__straggler__jitter": -0.1}, r"fl.straggler.jitter: must be a finite number"),
        ({"local__lr": 0.0}, r"local.lr: must be a finite number in \(0, inf\), got 0.0"),
        ({"local__lr": float("nan")}, r"local.lr: must be a finite number"),
        ({"fl__server_lr": -1.0}, r"fl.server_lr: must be a finite number in \(0, inf\)"),
        ({"fl__aggregator": "mode"}, r"fl.aggregator: got 'mode'; choose one of \('mean'"),
        ({"fl__trim_fraction": 0.5}, r"fl.trim_fraction: must be a finite number in \[0, 0.5\)"),
        ({"fl__krum_byzantine": -1}, r"fl.krum_byzantine: must be >= 0"),
        ({"rollout__top_p": 1.5}, r"rollout.top_p: must be a finite number in \(0, 1\]"),
        ({"model__lora__targets": ("q_proj", "attn")}, r"model.lora.targets: unknown \['attn'\]"),
        ({"model__path": "/no/such/model"}, r"model.path: /no/such/model does not exist"),
        ({"data__limit": 2}, r"data.limit: 2 examples cannot give 4 clients"),
        (
            {"task__eval_split": "validation"},
            r"task.eval_split: got 'validation'; task 'arithmetic' has splits \('train', 'test'\)",
        ),
        (
            {"eval__multiple_choice": "ppl"},
            r"eval.multiple_choice: got 'ppl'; choose one of \('loglik', 'generate'\)",
        ),
        (
            {"algorithm__name": "tpaw", "algorithm__lam": 0.0},
            r"algorithm.lam: must be a finite number in \(0, inf\), got 0.0",
        ),
        ({"algorithm__eta": -6.0}, r"algorithm.eta: must be a finite number in \(0, inf\)"),
        ({"algorithm__gamma": -0.5}, r"algorithm.gamma: must be a finite number in \[0, inf\)"),
        ({"algorithm__n_max": 0}, r"algorithm.n_max: must be >= 1, got 0"),
        ({"algorithm__beta": 0.0}, r"algorithm.beta: must be a finite number in \(0, inf\)"),
        (
            {"algorithm__label_smoothing": 0.7},
            r"algorithm.label_smoothing: must be a finite number in \[0, 0.5\]",
        ),
        ({"algorithm__opponent_rounds": 0}, r"algorithm.opponent_rounds: must be >= 1, got 0"),
        (
            {"algorithm__pool_on_error": "ignore"},
            r"algorithm.pool_on_error: got 'ignore'; choose one of \('raise', 'drop'\)",
        ),
        ({"eval__task": "mmlu"}, r"eval.task: got 'mmlu'; choose one of"),
        (
            {"model__remat": "dots_saveable"},
            r"model.remat: got 'dots_saveable'; choose one of \('none', 'full', 'dots'\)",
        ),
        (
            {"local__micro_batch_size": 5},
            r"local.micro_batch_size: 5 does not divide local.batch_size = 16",
        ),
        (
            {"local__micro_batch_size": 32},
            r"local.micro_batch_size: 32 does not divide local.batch_size = 16",
        ),
        ({"local__micro_batch_size": -1}, r"local.micro_batch_size: must be >= 0, got -1"),
        (
            {"eval__task": "arc_challenge", "eval__split": "dev"},
            r"eval.split: got 'dev'; eval.task 'arc_challenge' has splits",
        ),
        (
            {"distributed__initialize": "yes"},
            r"distributed.initialize: got 'yes'; choose 'auto', True or False",
        ),
        (
            {"distributed__coordinator_address": "10.0.0.1"},
            r"distributed.coordinator_address: must be 'host:port' or '', got '10.0.0.1'",
        ),
        (
            {"distributed__num_processes": 2, "distributed__process_id": 2},
            r"distributed.process_id: 2 is not below num_processes = 2",
        ),
        (
            {"distributed__heartbeat_timeout_s": 0},
            r"distributed.heartbeat_timeout_s: must be a whole number of seconds >= 1, got 0",
        ),
    ],
)
def test_errors_name_the_field(changes, expected):
    assert re.search(expected, _error(**changes)), _error(**changes)


@pytest.mark.parametrize("micro_batch_size", [0, 1, 4, 16])
def test_micro_batch_sizes_that_divide_the_batch_are_accepted(micro_batch_size):
    config = default_config()
    config.local.micro_batch_size = micro_batch_size
    config_lib.validate(config)


def test_pairwise_algorithms_are_accepted():
    for name in ("spin", "tpaw", "dpo"):
        config = default_config()
        config.algorithm.name = name
        config_lib.validate(config)


def test_all_errors_are_reported_together():
    message = _error(fl__rounds=0, fl__backend="tpu", local__steps=0)
    assert message.count("\n") == 3
    assert "fl.rounds" in message and "fl.backend" in message and "local.steps" in message


def test_missing_data_dir_names_path_and_setting(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    message = _error(task__name="gsm8k", task__data_dir=str(missing))
    assert (
        f"task.data_dir: the data directory {missing} (from task.data_dir) does not exist"
        in message
    )
    monkeypatch.setenv("FEDSP_DATA_DIR", str(missing))
    message = _error(task__name="gsm8k")
    assert f"{missing} (from $FEDSP_DATA_DIR) does not exist" in message


def test_missing_split_file_names_the_file(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("{}\n")
    message = _error(task__name="gsm8k", task__data_dir=str(tmp_path))
    assert (
        f"task.eval_split: split 'test' of 'gsm8k' is not on disk: {tmp_path / 'gsm8k' / 'test.jsonl'}"
        in message
    )
    assert "task.train_split" not in message


def test_a_bad_task_option_names_task_options():
    message = _error(task__name="arc_challenge", task__options={"prompt_style": "paper"})
    assert "task.options: prompt_style must be one of ('fedsp', 'spear'), got 'paper'" in message


def test_split_slices_validate_against_the_whole_splits_file(tmp_path, monkeypatch):
    # The offline ARC folder holds only the test file: slices of it are on disk, "train" is not.
    monkeypatch.delenv("FEDSP_DATA_DIR", raising=False)
    (tmp_path / "arc_challenge").mkdir()
    (tmp_path / "arc_challenge" / "ARC-Challenge-Test.jsonl").write_text("{}\n")
    config = default_config()
    config.task.name, config.task.data_dir = "arc_challenge", str(tmp_path)
    config.task.options = {"source": "local"}
    config.task.train_split, config.task.eval_split = "test[:75%]", "test[75%:]"
    config_lib.validate(config)
    arc = {
        "task__name": "arc_challenge",
        "task__data_dir": str(tmp_path),
        "task__options": {"source": "local"},
        "task__eval_split": "test[75%:]",
    }
    message = _error(**arc, task__train_split="train[:75%]")
    assert "task.train_split: split 'train[:75%]' of 'arc_challenge' is not on disk" in message
    message = _error(**{**arc, "task__eval_split": "dev[1:]"}, task__train_split="test[:75%]")
    assert (
        "task.eval_split: got 'dev[1:]'; task 'arc_challenge' has splits ('train', "
        "'validation', 'test') or a slice such as 'test[:75%]'"
    ) in message


def test_empty_client_names_the_partition_fields(monkeypatch):
    # The partitions give every client an example; the check guards any other split.
    config = default_config()
    config.data.partition = "iid"
    train = data.get_task("arithmetic").load("train", limit=12, seed=0)
    assert [len(s) for s in run_setup.client_shards(config, train)] == [3, 3, 3, 3]
    shards = [np.arange(3), np.arange(0), np.arange(3, 5), np.arange(0)]
    monkeypatch.setattr(data, "iid_partition", lambda *args: shards)
    with pytest.raises(
        ValueError, match=r"data.partition='iid' left client\(s\) \[1, 3\] of data.num_clients=4"
    ):
        run_setup.client_shards(config, train)


def test_pmap_backend_needs_placeable_clients():
    import jax

    devices = jax.local_device_count()
    message = _error(
        fl__backend="pmap", data__num_clients=devices * 2 + 1, fl__clients_per_round=devices + 1
    )
    assert f"{devices + 1} clients cannot be split over {devices} devices" in message


def test_reuse_cache_must_be_a_bool():
    config = default_config()
    with config.ignore_type():
        config.rollout.reuse_cache = "yes"
    with pytest.raises(ValueError, match=r"rollout.reuse_cache: must be True or False, got 'yes'"):
        config_lib.validate(config)


def test_missing_fields_are_named():
    config = default_config()
    del config.rollout["batch_size"]
    del config["log"]
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['log', 'rollout.batch_size'\]"):
        config_lib.validate(config)


def test_max_grad_norm_zero_means_no_clipping():
    config = default_config()
    config.local.max_grad_norm = 0.0
    config_lib.validate(config)
    assert "local.max_grad_norm" in _error(local__max_grad_norm=-1.0)


def test_rollout_batch_size_is_declared_and_checked():
    assert default_config().rollout.batch_size == 64
    assert "rollout.batch_size: must be >= 1, got 0" in _error(rollout__batch_size=0)


def test_algorithm_names_come_from_the_registry():
    import fedsp

    fedsp.register_algorithm("test_config_echo", lambda config: None)
    config = default_config()
    config.algorithm.name = "test_config_echo"
    config_lib.validate(config)
    assert "test_config_echo" in _error(algorithm__name="nope")


def test_mesh_fields_are_checked_against_the_round_and_the_devices():
    import jax

    devices = jax.device_count()
    assert "fl.mesh.clients: 3 does not divide fl.clients_per_round = 4" in _error(
        fl__mesh__clients=3
    )
    message = _error(fl__mesh__model=devices + 1)
    assert f"fl.mesh.model: {devices + 1} is more than the {devices} devices" in message
    assert "fl.mesh.model: must be 'auto' or a positive integer, got 'wide'" in _error(
        fl__mesh__model="wide"
    )
    assert "fl.mesh: the pmap backend places clients itself" in _error(
        fl__backend="pmap", fl__mesh__model=2
    )


def test_mesh_auto_and_integers_validate_and_override_from_flags():
    config = default_config()
    config.fl.mesh.clients, config.fl.mesh.model = 2, "auto"
    config_lib.validate(config)
    assert config_lib.requested_mesh(config.fl) == (2, "auto")
    config.fl.backend = "loop"
    config.fl.mesh.clients = "auto"
    assert config_lib.requested_mesh(config.fl) == (1, "auto")
