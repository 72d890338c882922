"""The pairwise self-play settings (SPIN, TPAW, DPO), with the source of every value.

Sources:
- TPAW (Li et al., ACL 2026, arXiv 2605.09922): η = 6 (response reweighting), γ = 0.5
  (player weighting), N_max = 3 players (the last checkpoints), opponent data
  D_t ∪ D_{t−1} ∪ D_{t−2}, one y_gen per prompt per iteration, from an SFT model; GSM8K
  from Qwen2.5-1.5B and UltraChat (50k) — the values quoted in fedsp issue 5. The paper's repository (github.com/lab-klc/TPAW) holds only a README, so the
  training recipe below is the SPIN reference's, which TPAW extends.
- SPIN reference (github.com/uclaml/SPIN): ``configs/config.yaml``: beta 0.1 (fedsp's
  ``algorithm.lam``), per_device_train_batch_size 8 on 8 GPUs (global batch 64),
  num_train_epochs 3, max_length 1024, max_prompt_length 512, seed 42, learning_rate
  5e-7 with optim rmsprop and warmup_ratio 0.1; ``configs/config_iter1.yaml``: the data of
  the current and the previous iteration (``opponent_rounds`` 2); ``spin/generate.py``:
  temperature 0.8, top_p 0.95, max_tokens 256; four iterations (iter0–iter3) on 50k
  UltraChat-200k prompts (``train_sft``).
- DPO (Rafailov et al. 2023, arXiv 2305.18290): β = 0.1.

Deliberate differences, all because fedsp trains LoRA adapters in federated rounds:
- an iteration is a round of one client holding all the data (centralized), which
  generates y_gen for every prompt (``rollout.prompts_per_client`` = the data size);
- LoRA r16/α32 on all projections of all layers with AdamW at 5e-5 (the SPEAR
  reference's LoRA rate), not full fine-tuning with RMSprop at 5e-7;
- ``local.steps`` = epochs × pairs / batch of randomly drawn minibatches, for 3 epochs
  over a full round's training set (this iteration's prompts × ``opponent_rounds``; the
  first rounds, with less opponent data, make more passes), constant LR within and
  across rounds (no warmup);
- ``model.path`` names the base model: TPAW and SPIN start from an SFT model, so first
  fine-tune it (e.g. ``experiments/configs/baselines/sft_*`` style, or any SFT
  checkpoint) and point ``--config.model.path`` at that directory.

Hardware: the settings are fitted by the capacity planner (``python -m experiments.plan
--config=<file>``; BENCHMARKS.md, "Capacity planner") for `PLAN_TARGETS` of the model: a
TPU v5e-8 (8 chips of 16 GiB) for Qwen2.5-1.5B, a TPU v5p-8 (4 chips of 95 GiB) for
Llama-3.1-8B. `FITTED` sets the mesh, ``model.remat``, ``local.micro_batch_size`` and the
evaluation batch; none changes the numbers (the effective batch stays 64 pairs). One
client cannot split rows over a clients axis, so the mesh is (1, all devices): the model
axis shards the frozen base.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import reference
from fedsp.config import default_config

MODELS = {"qwen2p5_1p5b": "Qwen/Qwen2.5-1.5B", "llama3p1_8b": "meta-llama/Llama-3.1-8B"}
# The device target each model's settings are fitted for (`fedsp.plan.targets`).
PLAN_TARGETS = {"qwen2p5_1p5b": "v5e-8", "llama3p1_8b": "v5p-8"}
# (dataset, model) -> memory levers that fit PLAN_TARGETS[model] (`reference.fit_levers`).
_PAIRS = dict(remat="full", micro_batch=8, rollout_batch=64, reuse_cache=True)
FITTED = {
    ("gsm8k", "qwen2p5_1p5b"): dict(_PAIRS, eval_batch=64),
    # ARC-Challenge log-likelihood rows: [rows, T, 151,936] float32 logits per batch.
    ("ultrachat", "qwen2p5_1p5b"): dict(_PAIRS, eval_batch=16),
    ("gsm8k", "llama3p1_8b"): dict(_PAIRS, eval_batch=64),
}
GSM8K_TRAIN = 7473  # openai/gsm8k main/train
GSM8K_TEST = 1319
ULTRACHAT_PROMPTS = 50_000  # SPIN's 50k UltraChat-200k prompts
SPIN_BATCH = 8 * 8  # per_device_train_batch_size × GPUs
SPIN_EPOCHS = 3
# opponent_rounds of each algorithm (None: the algorithm's default, shown for reading).
OPPONENT_ROUNDS = {"spin": 2, "tpaw": 3, "dpo": 1}


def selfplay_config(algorithm: str, dataset: str, model: str) -> ml_collections.ConfigDict:
    """The paper-scale setting of ``algorithm`` ("spin" | "tpaw" | "dpo") on ``dataset``
    ("gsm8k" | "ultrachat"), centralized (one client holding all the data)."""
    config = default_config()
    config.seed = 42  # SPIN config.yaml
    config.model.path = MODELS[model]
    config.model.dtype = "bfloat16"
    config.model.lora.rank = 16  # fedsp: LoRA as the SPEAR reference (the papers: full FT)
    config.model.lora.alpha = 32.0

    prompts = GSM8K_TRAIN if dataset == "gsm8k" else ULTRACHAT_PROMPTS
    if dataset == "gsm8k":
        config.task.name = "gsm8k"
        config.task.train_split, config.task.eval_split = "train", "test"
        config.eval.examples = GSM8K_TEST
        config.eval.max_new_tokens = 256
    else:
        config.task.name = "ultrachat"  # hub only: HuggingFaceH4/ultrachat_200k
        config.task.train_split, config.task.eval_split = "train_sft", "test_sft"
        config.data.limit = ULTRACHAT_PROMPTS
        # Chat has no checkable answer; SPIN/TPAW report the Open LLM Leaderboard, of
        # which ARC-Challenge (25-shot there, zero-shot log-likelihood here) is one task.
        config.eval.task = "arc_challenge"
        config.eval.split = "test"
        config.eval.multiple_choice = "loglik"
        config.eval.examples = 1172

    config.data.num_clients = 1
    config.data.partition = "iid"
    config.fl.clients_per_round = 1
    config.fl.rounds = 4  # SPIN iterations iter0..iter3
    config.fl.server_optimizer = "fedavg"
    config.fl.server_lr = 1.0  # one client: the server applies its update exactly

    config.algorithm.name = algorithm
    config.algorithm.lam = 0.1  # SPIN beta
    config.algorithm.eta = 6.0  # TPAW
    config.algorithm.gamma = 0.5  # TPAW
    config.algorithm.n_max = 3  # TPAW
    config.algorithm.beta = 0.1  # DPO
    config.algorithm.opponent_rounds = OPPONENT_ROUNDS[algorithm]

    config.rollout.prompts_per_client = prompts  # y_gen for every SFT prompt per iteration
    config.rollout.max_new_tokens = 256  # SPIN generate.py max_tokens
    config.rollout.temperature = 0.8  # SPIN generate.py
    config.rollout.top_p = 0.95  # SPIN generate.py

    config.local.batch_size = SPIN_BATCH
    config.local.steps = SPIN_EPOCHS * prompts * OPPONENT_ROUNDS[algorithm] // SPIN_BATCH
    config.local.max_len = 1024  # SPIN max_length
    config.local.lr = 5e-5  # fedsp LoRA rate (SPIN full FT: 5e-7)
    config.local.lr_min = 5e-5
    config.local.warmup_ratio = 0.0
    config.local.weight_decay = 0.0
    config.local.max_grad_norm = 1.0

    config.eval.every = 1
    config.eval.batch_size = 64
    reference.fit_levers(config, FITTED[(dataset, model)])
    return config


def smollm2_config(algorithm: str, federated: bool = False) -> ml_collections.ConfigDict:
    """A CPU-scale GSM8K run from SmolLM2-135M-Instruct (the default asset; its instruct
    tuning is the SFT start): three rounds so TPAW's team fills up (1, 2, 3 players),
    evaluated before training and after the last round on the same 32 test problems
    (greedy, 160 new tokens).

    Centralized: one client with 8 prompts a round. Federated: 4 clients on disjoint IID
    shards of GSM8K train, 2 prompts each, all playing every round (FedAvg).
    Sized for 2 CPU cores (README.md gives the expected time).
    """
    config = default_config()
    config.model.lora.rank = 8
    config.model.lora.alpha = 16.0
    config.task.name = "gsm8k"
    config.task.train_split, config.task.eval_split = "train", "test"
    config.data.num_clients = 4 if federated else 1
    config.data.partition = "iid"
    config.fl.clients_per_round = config.data.num_clients
    config.fl.rounds = 3
    # vmap over 4 clients holds 4 clients' activations at once: it peaked above 21 GB
    # (OOM on a 24 GB machine); the loop backend trains them one after the other, with
    # the same numbers.
    config.fl.backend = "loop" if federated else "vmap"

    config.algorithm.name = algorithm
    config.algorithm.lam = 0.1
    config.algorithm.eta = 6.0
    config.algorithm.gamma = 0.5
    config.algorithm.n_max = 3
    config.algorithm.beta = 0.1

    config.rollout.prompts_per_client = 2 if federated else 8
    config.rollout.max_new_tokens = 96
    config.rollout.temperature = 0.8
    config.rollout.top_p = 0.95

    config.local.steps = 3
    config.local.batch_size = 4
    # Few rounds and small adapters: a higher rate than the paper-scale one (as demo.py).
    config.local.lr = 2e-4
    config.local.lr_min = 2e-4
    config.local.warmup_ratio = 0.0
    config.local.max_len = 256

    config.eval.every = 0
    config.eval.examples = 32
    config.eval.max_new_tokens = 160
    config.eval.batch_size = 32
    return config
