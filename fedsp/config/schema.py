"""The experiment schema: ``default_config()`` holds every field and its one default.

Every run, table cell and notebook starts from ``default_config()`` and changes only what
differs, so every field exists everywhere and ``--config.<section>.<field>=value`` works
for all of them (the sections are listed in `fedsp.config`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from fedsp.model.lora import LORA_TARGETS
from fedsp.model.sharding import AUTO
from fedsp.selfplay.hparams import DEFAULT_PROTECTED_STRINGS

__all__ = [
    "DTYPES",
    "MULTIPLE_CHOICE_EVALS",
    "PARTITIONS",
    "POOL_ON_ERROR",
    "default_config",
    "requested_mesh",
]

POOL_ON_ERROR = ("raise", "drop")
PARTITIONS = ("iid", "dirichlet")
DTYPES = ("float32", "bfloat16", "float16")
MULTIPLE_CHOICE_EVALS = ("loglik", "generate")


def default_config() -> ml_collections.ConfigDict:
    """The whole schema with its defaults: SPEAR on synthetic arithmetic with
    SmolLM2-135M-Instruct (see the module docstring for the sections)."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.path = ""
    config.model.dtype = "float32"
    config.model.lora = ml_collections.ConfigDict()
    config.model.lora.rank = 16
    config.model.lora.alpha = 32.0
    config.model.lora.targets = tuple(LORA_TARGETS)
    # Layer indices that get adapters; () means all. Negative indices count from the
    # last layer, so the reference's `last_n_layers: n` is tuple(range(-n, 0)).
    config.model.lora.layers = ()
    # What the backward pass recomputes per layer instead of keeping (`fedsp.model.
    # transformer.REMAT_POLICIES`): "none" keeps every activation (fastest, most memory);
    # "dots" keeps the projections' outputs and recomputes attention and elementwise ops;
    # "full" keeps only each layer's input and recomputes the layer (least memory, about
    # one more forward pass). Gradients are the same.
    config.model.remat = "none"

    config.task = ml_collections.ConfigDict()
    config.task.name = "arithmetic"
    config.task.data_dir = ""
    config.task.options = ml_collections.ConfigDict()
    config.task.train_split = "train"
    config.task.eval_split = "test"

    config.data = ml_collections.ConfigDict()
    config.data.num_clients = 4
    config.data.partition = "dirichlet"
    config.data.alpha = 1.0
    config.data.examples_per_client = 0
    config.data.limit = 0

    config.algorithm = ml_collections.ConfigDict()
    config.algorithm.name = "spear"
    config.algorithm.feedback = "hint"
    config.algorithm.max_revisions = 2
    config.algorithm.lambda_win = 1.0
    config.algorithm.lambda_lose = 0.1
    config.algorithm.margin = 0.3
    config.algorithm.tail_tokens = 0
    # SPEAR's max_lose_ratio: lose traces are capped at rho × win traces.
    config.algorithm.rho = 2.0
    config.algorithm.group_size = 4
    config.algorithm.clip_eps = 0.2
    config.algorithm.kl_coef = 0.02
    # AWR weighting of win traces; 0 turns it off (the SPEAR reference has none).
    config.algorithm.awr_temperature = 0.0
    config.algorithm.awr_max_weight = 20.0
    config.algorithm.baseline_decay = 0.9
    # Reward of a first answer: "verdict" (1/0) or "score" (the feedback's score).
    config.algorithm.reward = "verdict"
    # Token strings unlikelihood never pushes down (the answer format every reply writes).
    config.algorithm.protected_strings = DEFAULT_PROTECTED_STRINGS
    # Pairwise self-play (SPIN / TPAW / DPO, `fedsp.selfplay.pairs`). lam: the implicit
    # reward scale λ of SPIN and TPAW (SPIN's β = 0.1, uclaml/SPIN configs/config.yaml);
    # eta, gamma, n_max: TPAW's response weight η, player-weight sharpness γ and team
    # size N_max (arXiv 2605.09922: 6, 0.5, 3); beta, label_smoothing: DPO's β and cDPO ε;
    # opponent_rounds: rounds of opponent data trained per round, this round's included
    # (None: the algorithm's own, SPIN 2, TPAW 3, DPO 1); pool_on_error: a damaged
    # player-pool entry "raise"s or is "drop"ped with a warning.
    config.algorithm.lam = 0.1
    config.algorithm.eta = 6.0
    config.algorithm.gamma = 0.5
    config.algorithm.n_max = 3
    config.algorithm.beta = 0.1
    config.algorithm.label_smoothing = 0.0
    config.algorithm.opponent_rounds = config_dict.placeholder(int)
    config.algorithm.pool_on_error = "drop"

    config.rollout = ml_collections.ConfigDict()
    config.rollout.prompts_per_client = 16
    config.rollout.max_new_tokens = 64
    config.rollout.temperature = 0.8
    config.rollout.top_p = 0.95
    # Most rows per sampler call: the KV cache's memory bound.
    config.rollout.batch_size = 64
    # One sampler call per prompt-length bucket instead of per head bucket.
    config.rollout.split_by_length = False
    # SPEAR's revisions reuse the first answers' keys/values (prefill only the feedback
    # turn); False saves that memory (`fedsp.selfplay.rollout.SamplingParams`).
    config.rollout.reuse_cache = True

    config.local = ml_collections.ConfigDict()
    config.local.steps = 5
    config.local.batch_size = 16
    # Rows per forward/backward pass: each step's local.batch_size rows go through the
    # model in local.batch_size / micro_batch_size passes (the SPEAR reference's
    # grad_accum_steps = batch_size / micro_batch_size), so activation memory is that of
    # micro_batch_size rows; the loss, metrics and gradient are the full batch's. Costs
    # one extra forward pass per step (`fedsp.selfplay.train.micro_batched_token_logps`).
    # 0 = the whole batch in one pass.
    config.local.micro_batch_size = 0
    config.local.lr = 5e-5
    config.local.lr_min = 1e-5
    config.local.warmup_ratio = 0.1
    config.local.weight_decay = 0.0
    # Global-norm clipping of each local step's gradient; 0 turns clipping off.
    config.local.max_grad_norm = 1.0
    config.local.max_len = 256

    config.fl = ml_collections.ConfigDict()
    config.fl.rounds = 10
    config.fl.clients_per_round = 4
    # How a round's clients are drawn (`fedsp.data.sample_clients`), from (seed, round):
    # "fixed" takes clients_per_round distinct clients; "poisson" takes each client
    # independently with probability clients_per_round / data.num_clients (DP-FedAvg's
    # accounting then uses Poisson sampling; a round may have no client: its server step
    # is skipped).
    config.fl.sampling = "fixed"
    config.fl.backend = "vmap"
    # vmap backend: 0 trains all of a device's clients of a round together; k >= 1 trains
    # them k at a time, one group after another in the same program (less memory). The
    # loop backend trains one at a time anyway; pmap takes 0 only.
    config.fl.clients_at_once = 0
    # The (clients, model) device mesh (`fedsp.model.sharding.mesh_shape`): clients
    # splits the round's clients (and sampler rows) over devices, model shards the frozen
    # base weights within each client group. "auto" fills the devices; the loop and pmap
    # backends place clients themselves, so their auto clients axis is 1.
    config.fl.mesh = ml_collections.ConfigDict()
    # Each takes "auto" or an integer (an untyped field: --config.fl.mesh.model=2 works).
    config.fl.mesh.clients = ml_collections.FieldReference(AUTO, field_type=object)
    config.fl.mesh.model = ml_collections.FieldReference(1, field_type=object)
    config.fl.server_optimizer = "fedavg"
    config.fl.server_lr = 1.0
    config.fl.b1 = 0.9
    config.fl.b2 = 0.99
    config.fl.tau = 1e-3
    # Initial second moment of fedadam/fedyogi; None means tau² (the SPEAR reference).
    config.fl.v0 = config_dict.placeholder(float)
    config.fl.client_weighting = "examples"
    config.fl.weight_temperature = 1.0
    # Clients whose advantage is below it send nothing; None keeps every client.
    config.fl.prune_threshold = config_dict.placeholder(float)
    # How the kept clients' adapters are combined (`fedsp.core.robust`): mean,
    # norm_bounded_mean (each client's delta clipped to norm_bound), trimmed_mean (drops
    # the trim_fraction largest and smallest per coordinate), median, krum, multi_krum
    # (the mean of the multi_krum_keep best Krum scores; both assume up to
    # krum_byzantine attackers). The server optimizer steps towards the result.
    config.fl.aggregator = "mean"
    config.fl.trim_fraction = 0.1
    config.fl.krum_byzantine = 0
    config.fl.multi_krum_keep = 2
    config.fl.norm_bound = 1.0
    # User-level DP-FedAvg (`fedsp.core.privacy`): each kept client's change is clipped to
    # clip_norm (0 turns DP off), the clipped changes are summed with Gaussian noise of
    # std noise_multiplier · clip_norm and divided by clients_per_round. target_epsilon
    # (if set) replaces noise_multiplier by the one that spends exactly that ε over
    # fl.rounds; max_epsilon (if set) stops the run before a round would exceed it.
    # Simulated faults (`fedsp.federated.faults`), drawn from (seed, round, client): a
    # sampled client does not return with probability dropout; a straggler returns after
    # straggler.deadline simulated seconds (0: no deadline) and its update is dropped.
    # A client's round takes 1 / speed × jitter simulated seconds (every client does the
    # same work in a round): speed is log-normal with σ = straggler.speed_spread, fixed
    # per client by the seed; jitter is log-normal with σ = straggler.jitter, drawn per
    # (round, client). A round with fewer than min_clients updates in time skips its
    # server step. byzantine.fraction of the clients are attackers whose uploads
    # byzantine.attack poisons (sign_flip, scale, gaussian, nan, shift_mean) with
    # strength byzantine.scale.
    config.fl.dropout = 0.0
    config.fl.straggler = ml_collections.ConfigDict()
    config.fl.straggler.deadline = 0.0
    config.fl.straggler.speed_spread = 0.0
    config.fl.straggler.jitter = 0.0
    config.fl.min_clients = 1
    config.fl.byzantine = ml_collections.ConfigDict()
    config.fl.byzantine.fraction = 0.0
    config.fl.byzantine.attack = "sign_flip"
    config.fl.byzantine.scale = 1.0
    config.fl.dp = ml_collections.ConfigDict()
    config.fl.dp.clip_norm = 0.0
    config.fl.dp.noise_multiplier = 0.0
    config.fl.dp.target_epsilon = config_dict.placeholder(float)
    config.fl.dp.delta = 1e-5
    config.fl.dp.max_epsilon = config_dict.placeholder(float)

    config.eval = ml_collections.ConfigDict()
    config.eval.every = 1
    config.eval.examples = 64
    config.eval.max_new_tokens = 64
    config.eval.batch_size = 32
    config.eval.multiple_choice = "loglik"
    # Evaluate on another task ("" = task.name) and split ("" = task.eval_split).
    config.eval.task = ""
    config.eval.split = ""

    # Multi-host runs (`fedsp.distributed`): every host runs the same command; these
    # fields say how the processes find each other. initialize: "auto" joins when a
    # coordinator address is set (here or as $JAX_COORDINATOR_ADDRESS), True always joins
    # (unset fields detected by JAX on Cloud TPU / SLURM / Open MPI), False never.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = ml_collections.FieldReference(AUTO, field_type=object)
    config.distributed.coordinator_address = ""
    # "" binds the coordinator on every interface (JAX's default), "127.0.0.1:port" on one.
    config.distributed.coordinator_bind_address = ""
    config.distributed.num_processes = 0  # 0: detected
    config.distributed.process_id = -1  # -1: detected
    config.distributed.initialization_timeout_s = 300
    # A process silent for this long is declared dead and the others stop with an error.
    config.distributed.heartbeat_timeout_s = 100

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every = 1
    config.checkpoint.keep = 2

    config.log = ml_collections.ConfigDict()
    config.log.tensorboard = True
    config.log.progress = True
    return config


def requested_mesh(fl: ml_collections.ConfigDict) -> tuple[int | str, int | str]:
    """``(fl.mesh.clients, fl.mesh.model)`` as `fedsp.model.sharding.mesh_shape` takes
    them: an auto clients axis is 1 for the loop and pmap backends."""
    clients = fl.mesh.clients
    if fl.backend != "vmap" and clients == AUTO:
        clients = 1
    return clients, fl.mesh.model
