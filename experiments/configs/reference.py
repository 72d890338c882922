"""The SPEAR paper's settings (arXiv 2605.07977), copied one to one from the reference
code's ``configs/<dataset>_<model>_spear.yaml`` in github.com/lee3296/SPEAR.

Field mapping (reference → fedsp): lora.last_n_layers → model.lora.layers (the last n);
fl.local_rollout_steps → rollout.prompts_per_client; fl.local_train_steps → local.steps;
gen.max_new_tokens_y0 → rollout.max_new_tokens (and eval.max_new_tokens);
gen.num_revisions → algorithm.max_revisions; spear.unlikelihood_margin →
algorithm.margin; spear.ul_tail_tokens → algorithm.tail_tokens; spear.max_lose_ratio →
algorithm.rho; optim.batch_size × optim.grad_accum_steps → local.batch_size (the
effective batch; local.micro_batch_size = optim.batch_size passes as many rows per
forward as the reference); model.max_seq_len → local.max_len; data.eval_every →
eval.every.
The reference's server is FedAvg (its default ``fl.aggregation``). ARC-Challenge and
HellaSwag pose the reference's prompt (``task.options.prompt_style = "spear"``,
`fedsp.data.multiple_choice`).

Deliberate differences: feedback is our non-leaking "hint" provider (the reference's
"oracle" hints quote the gold option); "math" is our MATH generation task (the
reference's math_mcqa turns MATH into multiple choice); model.path names the Hugging
Face model and must be pointed at its downloaded directory
(``--config.model.path=/path/to/Qwen2.5-1.5B``).

Hardware: every setting is fitted for a TPU v5e-8 (`PLAN_TARGET`: 8 chips of 16 GiB) by
the capacity planner, ``python -m experiments.plan --config=<file>`` (BENCHMARKS.md,
"Capacity planner", has the table): `FITTED` sets the mesh, ``model.remat``,
``local.micro_batch_size``, ``rollout.batch_size`` / ``rollout.reuse_cache`` and
``eval.batch_size``, none of which changes the numbers (the effective batch stays
``local.batch_size``), only what a device holds at once.
"""

from __future__ import annotations

import ml_collections

from fedsp.config import default_config

# model key -> (Hugging Face name, layers of the model)
MODELS = {"qwen2p5_1p5b": ("Qwen/Qwen2.5-1.5B", 28), "llama3p2_3b": ("meta-llama/Llama-3.2-3B", 28)}

# (task, model) -> reference yaml values
_SHARED = dict(
    rank=16,
    alpha=32.0,
    num_clients=50,
    dirichlet_alpha=1.0,
    eval_every=5,
    temperature=0.8,
    num_revisions=2,
    lambda_win=1.0,
    lambda_lose=0.1,
    margin=0.3,
    warmup_ratio=0.1,
    weight_decay=0.0,
)
SETTINGS = {
    ("arc_challenge", "qwen2p5_1p5b"): dict(
        source="arc_challenge_qwen1.5b_spear.yaml",
        last_n_layers=36,
        per_client=400,
        seed=44,
        rounds=100,
        clients_per_round=3,
        prompts=160,
        steps=5,
        max_new_tokens=256,
        eval_batch=64,
        tail_tokens=0,
        rho=2.0,
        lr=5e-5,
        lr_min=1e-5,
        batch=16 * 1,
        max_len=2048,
    ),
    ("arc_challenge", "llama3p2_3b"): dict(
        source="arc_challenge_llama3b_spear.yaml",
        last_n_layers=28,
        per_client=400,
        seed=44,
        rounds=100,
        clients_per_round=3,
        prompts=160,
        steps=5,
        max_new_tokens=256,
        eval_batch=32,
        tail_tokens=0,
        rho=2.0,
        lr=5e-5,
        lr_min=1e-5,
        batch=8 * 2,
        max_len=2048,
    ),
    ("hellaswag", "qwen2p5_1p5b"): dict(
        source="hellaswag_qwen1.5b_spear.yaml",
        last_n_layers=36,
        per_client=400,
        seed=43,
        rounds=50,
        clients_per_round=5,
        prompts=160,
        steps=10,
        max_new_tokens=256,
        eval_batch=64,
        tail_tokens=0,
        rho=2.0,
        lr=5e-5,
        lr_min=1e-5,
        batch=16 * 1,
        max_len=2048,
    ),
    ("hellaswag", "llama3p2_3b"): dict(
        source="hellaswag_llama3b_spear.yaml",
        last_n_layers=28,
        per_client=400,
        seed=44,
        rounds=50,
        clients_per_round=5,
        prompts=160,
        steps=10,
        max_new_tokens=256,
        eval_batch=32,
        tail_tokens=0,
        rho=2.0,
        lr=5e-5,
        lr_min=1e-5,
        batch=8 * 2,
        max_len=2048,
    ),
    ("math", "qwen2p5_1p5b"): dict(
        source="math_mcqa_qwen1.5b_spear.yaml",
        last_n_layers=36,
        per_client=500,
        seed=44,
        rounds=50,
        clients_per_round=3,
        prompts=80,
        steps=5,
        max_new_tokens=512,
        eval_batch=32,
        tail_tokens=32,
        rho=4.0,
        lr=5.05e-5,
        lr_min=1e-5,
        batch=4 * 4,
        max_len=2048,
    ),
    ("math", "llama3p2_3b"): dict(
        source="math_mcqa_llama3b_spear.yaml",
        last_n_layers=28,
        per_client=500,
        seed=44,
        rounds=50,
        clients_per_round=3,
        prompts=80,
        steps=5,
        max_new_tokens=512,
        eval_batch=32,
        tail_tokens=32,
        rho=4.0,
        lr=5.05e-5,
        lr_min=1e-5,
        batch=4 * 4,
        max_len=2048,
    ),
    ("strategyqa", "qwen2p5_1p5b"): dict(
        source="strategyqa_qwen1.5b_spear.yaml",
        last_n_layers=36,
        per_client=400,
        seed=43,
        rounds=100,
        clients_per_round=5,
        prompts=80,
        steps=5,
        max_new_tokens=256,
        eval_batch=32,
        tail_tokens=24,
        rho=4.0,
        lr=1e-4,
        lr_min=5e-5,
        batch=16 * 1,
        max_len=1024,
    ),
    ("strategyqa", "llama3p2_3b"): dict(
        source="strategyqa_llama3b_spear.yaml",
        last_n_layers=36,
        per_client=400,
        seed=44,
        rounds=100,
        clients_per_round=5,
        prompts=80,
        steps=5,
        max_new_tokens=256,
        eval_batch=32,
        tail_tokens=24,
        rho=4.0,
        lr=1e-4,
        lr_min=5e-5,
        batch=16 * 1,
        max_len=1024,
    ),
}
# The device target the settings below are fitted for (`fedsp.plan.targets`).
PLAN_TARGET = "v5e-8"
# (task, model) -> memory levers that fit PLAN_TARGET. The mesh is ("auto", "auto"): on
# 8 devices the clients axis takes the largest divisor of fl.clients_per_round that fits
# (3 or 5) and the model axis the rest (8 // 3 = 2, 8 // 5 = 1), and the same config
# still validates on fewer devices. reuse_cache is off: keeping every first answer's
# keys/values for the revisions (and the copy gather_prefix makes of them) takes more
# than a device holds at 2048-token sequences, so revisions prefill their whole prompt.
_QWEN = dict(remat="full", micro_batch=4, rollout_batch=64, reuse_cache=False)
_LLAMA = dict(remat="full", micro_batch=2, rollout_batch=32, reuse_cache=False)
FITTED = {
    ("arc_challenge", "qwen2p5_1p5b"): dict(_QWEN, eval_batch=24),
    ("arc_challenge", "llama3p2_3b"): dict(_LLAMA, eval_batch=24),
    ("hellaswag", "qwen2p5_1p5b"): dict(_QWEN, eval_batch=40),
    ("hellaswag", "llama3p2_3b"): dict(_LLAMA, eval_batch=40),
    ("math", "qwen2p5_1p5b"): dict(_QWEN, eval_batch=24),
    ("math", "llama3p2_3b"): dict(_LLAMA, eval_batch=24),
    ("strategyqa", "qwen2p5_1p5b"): dict(_QWEN, eval_batch=30),
    ("strategyqa", "llama3p2_3b"): dict(_LLAMA, eval_batch=30),
}
_SPLITS = {
    "arc_challenge": ("train", "test"),
    "hellaswag": ("train", "validation"),
    "math": ("train", "test"),
    "strategyqa": ("train", "dev"),
}


def spear_config(task: str, model: str, algorithm: str = "spear") -> ml_collections.ConfigDict:
    """The reference setting for ``task`` × ``model``, run with ``algorithm``."""
    s = {**_SHARED, **SETTINGS[(task, model)]}
    name, num_layers = MODELS[model]
    config = default_config()
    config.seed = s["seed"]
    config.model.path = name
    config.model.dtype = "bfloat16"
    config.model.lora.rank = s["rank"]
    config.model.lora.alpha = s["alpha"]
    config.model.lora.layers = tuple(range(-min(s["last_n_layers"], num_layers), 0))
    config.task.name = task
    config.task.train_split, config.task.eval_split = _SPLITS[task]
    if task in ("arc_challenge", "hellaswag"):
        config.task.options.prompt_style = "spear"  # the reference's lettered-option prompt
    config.data.num_clients = s["num_clients"]
    config.data.partition = "dirichlet"
    config.data.alpha = s["dirichlet_alpha"]
    config.data.examples_per_client = s["per_client"]
    config.algorithm.name = algorithm
    config.algorithm.feedback = "hint"
    config.algorithm.max_revisions = s["num_revisions"]
    config.algorithm.lambda_win = s["lambda_win"]
    config.algorithm.lambda_lose = s["lambda_lose"]
    config.algorithm.margin = s["margin"]
    config.algorithm.tail_tokens = s["tail_tokens"]
    config.algorithm.rho = s["rho"]
    config.rollout.prompts_per_client = s["prompts"]
    config.rollout.max_new_tokens = s["max_new_tokens"]
    config.rollout.temperature = s["temperature"]
    config.local.steps = s["steps"]
    config.local.batch_size = s["batch"]
    config.local.lr = s["lr"]
    config.local.lr_min = s["lr_min"]
    config.local.warmup_ratio = s["warmup_ratio"]
    config.local.weight_decay = s["weight_decay"]
    config.local.max_len = s["max_len"]
    config.fl.rounds = s["rounds"]
    config.fl.clients_per_round = s["clients_per_round"]
    config.fl.server_optimizer = "fedavg"
    config.fl.server_lr = 1.0
    config.eval.every = s["eval_every"]
    config.eval.max_new_tokens = s["max_new_tokens"]
    config.eval.batch_size = s["eval_batch"]
    config.eval.examples = 500
    fit_levers(config, FITTED[(task, model)])
    return config


def fit_levers(config: ml_collections.ConfigDict, fitted: dict) -> None:
    """Sets the memory levers of `FITTED` (see the module docstring) on ``config``."""
    config.fl.mesh.clients = "auto"
    config.fl.mesh.model = "auto"
    config.model.remat = fitted["remat"]
    config.local.micro_batch_size = fitted["micro_batch"]
    config.rollout.batch_size = fitted["rollout_batch"]
    config.rollout.reuse_cache = fitted["reuse_cache"]
    config.eval.batch_size = fitted["eval_batch"]


def centralized_config(task: str, model: str) -> ml_collections.ConfigDict:
    """Centralized training on the pooled data of all clients: one client holding
    every example, taking part in every round (the federated upper bound)."""
    config = spear_config(task, model)
    pooled = config.data.num_clients * config.data.examples_per_client
    config.data.num_clients = 1
    config.data.examples_per_client = pooled
    config.fl.clients_per_round = 1
    return config
