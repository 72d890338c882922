"""The server step a config describes (`server_step_from_config`), its optimizer, the ε a
DP run has spent, and the step of a round with too few updates."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedsp.core.aggregation import server_optimizer
from fedsp.core.privacy import epsilon
from fedsp.federated.server import (
    DpSettings,
    RobustSettings,
    accounting_sampling,
    server_step,
)
from fedsp.federated.state import ClientUploads, ServerStep

__all__ = ["default_optimizer", "privacy_spent", "server_step_from_config", "skipped_step"]

PyTree = Any
# The DP noise's key stream, apart from the rollout and training keys of a round.
_DP_STREAM = 0x4450


def server_step_from_config(
    fl: ml_collections.ConfigDict,
    optimizer: optax.GradientTransformation,
    *,
    dp: DpSettings | None = None,
    seed: int = 0,
) -> ServerStep:
    """The server step ``config.fl`` describes: `fedsp.federated.server.server_step`
    with the configured client weighting, pruning and aggregator, and DP-FedAvg with
    ``dp`` (`DpSettings.from_config(config)`; its noise is drawn from (``seed``, the
    uploads' round), so a resumed run adds the same noise)."""

    def step(params: PyTree, opt_state: optax.OptState, uploads: ClientUploads):
        noise_key = None
        if dp is not None:
            noise_key = jax.random.fold_in(
                jax.random.fold_in(jax.random.key(seed), uploads.round), _DP_STREAM
            )
        return server_step(
            params,
            opt_state,
            uploads.params,
            np.asarray(uploads.stats["num_examples"]).astype(np.float32),
            np.asarray(uploads.stats["mean_advantage"]).astype(np.float32),
            optimizer=optimizer,
            mode=fl.client_weighting,
            temperature=fl.weight_temperature,
            threshold=fl.prune_threshold,
            robust=RobustSettings.from_config(fl),
            dp=dp,
            noise_key=noise_key,
        )

    return step


def privacy_spent(config: ml_collections.ConfigDict, rounds: int) -> float | None:
    """ε (at ``fl.dp.delta``) of the run's adapters after ``rounds`` DP-FedAvg rounds
    (`fedsp.core.privacy.epsilon` with the run's ``fl.sampling``: "fixed" samples clients
    without replacement, "poisson" is Poisson sampling at q = clients_per_round /
    num_clients), or None without DP. It is the ε of the sampling alone: simulated
    dropouts and stragglers (which only remove sampled clients, independently of their
    data) are not accounted."""
    dp = DpSettings.from_config(config)
    if dp is None:
        return None
    return epsilon(
        rounds,
        num_clients=config.data.num_clients,
        clients_per_round=config.fl.clients_per_round,
        noise_multiplier=dp.noise_multiplier,
        delta=config.fl.dp.delta,
        sampling=accounting_sampling(config.fl.sampling),
    )


def default_optimizer(fl: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The server optimizer ``config.fl`` names."""
    return server_optimizer(fl.server_optimizer, fl.server_lr, fl.b1, fl.b2, fl.tau, fl.v0)


def skipped_step(params: PyTree, opt_state: optax.OptState, uploads: ClientUploads):
    """The server step of a round with fewer than ``fl.min_clients`` updates: nothing
    changes, and the diagnostics say so."""
    c = len(uploads.clients)
    zero = jnp.float32(0.0)
    return (
        params,
        opt_state,
        {
            "weights": np.zeros(c, np.float32),
            "keep": np.zeros(c, bool),
            "finite": np.ones(c, bool),
            "applied": zero,
            "pseudo_grad_norm": zero,
            "update_norm": zero,
            "total_weight": zero,
        },
    )
