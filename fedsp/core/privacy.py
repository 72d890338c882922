"""User-level differential privacy for the server step: DP-FedAvg's clipped, noised sum
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models") and
its ε, accounted with Google's ``dp_accounting`` (``pip install 'fedsp[dp]'``).

One round, with θ_r the global adapters, Δ_k = θ_k − θ_r a kept client's change, C the
clip norm, z the noise multiplier and m the number of clients sampled per round
(``fl.clients_per_round``; with Poisson sampling the expected number):

    Δ̃_k = Δ_k · min(1, C / ‖Δ_k‖₂)                       (global L2 over all leaves)
    θ̄   = θ_r + (Σ_{k kept} Δ̃_k + N(0, (z·C)² I)) / m

Every client enters the sum with weight 1 (a data-dependent weight would change the
sensitivity) and the denominator is fixed (m, whatever the round's kept count), so one
client changes the noised sum by at most C. What is protected: each client's whole
contribution to the adapters over the run (client-level DP of the released adapters and
of everything computed from them). What is not: the metrics clients report beside their
updates (rewards, losses, counts, advantages, which also decide pruning), and evaluation
on data the server holds.

Accounting follows the run's ``fl.sampling``: "fixed" samples m of N clients without
replacement each round, for which ``dp_accounting`` analyses the replace-one neighbouring
relation (RDP); "poisson" takes each client with rate q = m / N, the add-or-remove-one
analysis (RDP or PLD).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from fedsp.core import checks
from fedsp.core.aggregation import dp_noise
from fedsp.core.robust import clipped_changes

__all__ = ["SAMPLINGS", "calibrate_noise", "dp_mean", "epsilon"]

PyTree = Any
SAMPLINGS = ("without_replacement", "poisson")


def dp_mean(
    server_params: PyTree,
    stacked: PyTree,
    include: jax.Array,
    *,
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    key: jax.Array,
) -> PyTree:
    """θ_r + (Σ_{k included} clip(θ_k − θ_r, C) + N(0, (z·C)²)) / denominator (module
    docstring), in the leaves' dtypes; every leaf draws its own noise from ``key``."""
    clipped = clipped_changes(server_params, stacked, clip_norm)
    total = jax.tree.map(
        lambda d: jnp.sum(jnp.where(include.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0), 0),
        clipped,
    )
    noised = dp_noise(total, noise_multiplier * clip_norm, key)
    return jax.tree.map(
        lambda s, n: (checks.upcast_float(s) + n / denominator).astype(s.dtype),
        server_params,
        noised,
    )


def _event(num_clients: int, clients_per_round: int, noise_multiplier: float, sampling: str):
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(clients_per_round / num_clients, gaussian)
    if sampling == "without_replacement":
        return dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, clients_per_round, gaussian
        )
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


def epsilon(
    rounds: int,
    *,
    num_clients: int,
    clients_per_round: int,
    noise_multiplier: float,
    delta: float,
    sampling: str = "without_replacement",
    accountant: str = "rdp",
) -> float:
    """ε after ``rounds`` rounds of DP-FedAvg at (ε, ``delta``): inf without noise, 0
    after no round.

    Args:
      accountant: "rdp" (Rényi DP, any sampling) or "pld" (privacy loss distributions,
        tighter; Poisson sampling only).
    """
    if rounds == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        import dp_accounting
        from dp_accounting.pld import pld_privacy_accountant
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("ε accounting needs dp_accounting: pip install 'fedsp[dp]'") from error
    event = _event(num_clients, clients_per_round, noise_multiplier, sampling)
    relation = (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if sampling == "without_replacement"
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    if accountant == "rdp":
        acc: Any = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    elif accountant == "pld":
        if sampling != "poisson":
            raise ValueError("the PLD accountant here takes Poisson sampling only")
        acc = pld_privacy_accountant.PLDAccountant()
    else:
        raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float,
    rounds: int,
    *,
    num_clients: int,
    clients_per_round: int,
    delta: float,
    sampling: str = "without_replacement",
) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ε after ``rounds`` rounds is at
    most ``target_epsilon`` (RDP accounting)."""

    def eps(z: float) -> float:
        return epsilon(
            rounds,
            num_clients=num_clients,
            clients_per_round=clients_per_round,
            noise_multiplier=z,
            delta=delta,
            sampling=sampling,
        )

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches ε = {target_epsilon}")
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high
