"""Simulated client faults for testing a federation's defences: clients that do not
return (dropout) and Byzantine clients that send poisoned updates.

Every draw is a function of (seed, round, client), so a resumed run meets the same
faults as an uninterrupted one:

- dropout: a sampled client does not return in a round with probability ``p``;
- Byzantine clients: the run's attackers are a fixed ⌊fraction · N⌋ of the N clients
  (chosen from the seed); when sampled, each replaces its honest adapters θ_k with

    sign_flip   θ_r − s·(θ_k − θ_r)            (its change reversed and scaled by s)
    scale       θ_r + s·(θ_k − θ_r)
    gaussian    θ_r + N(0, s²) per coordinate
    nan         NaN everywhere                (the server must reject it)
    shift_mean  θ_r + μ − s·σ, μ and σ the per-coordinate mean and std of the round's
                honest changes ("a little is enough", Baruch et al. 2019)

  with s = ``scale``. The attack happens where the upload leaves the client, before the
  server step (and before `RoundHooks.on_uploads`, which sees what the server receives).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedsp.federated.state import ClientUploads

__all__ = ["ATTACKS", "attack_uploads", "byzantine_clients", "returns", "simulate_faults"]

PyTree = Any
ATTACKS = ("sign_flip", "scale", "gaussian", "nan", "shift_mean")
_ATTACK_STREAM = 0x4259


def returns(clients: np.ndarray, probability: float, seed: int, round: int) -> np.ndarray:
    """[C] bool: which of the round's ``clients`` return their update (each stays away
    with ``probability``, drawn from (seed, round, client))."""
    if probability <= 0:
        return np.ones(len(clients), bool)
    draws = [np.random.default_rng([seed, round, int(k), 1]).random() for k in clients]
    return np.asarray(draws) >= probability


def byzantine_clients(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """The run's attackers: ⌊fraction · num_clients⌋ client ids, fixed by ``seed``."""
    count = int(np.floor(fraction * num_clients + 1e-9))
    order = np.random.default_rng([seed, 0x42]).permutation(num_clients)
    return np.sort(order[:count])


def attack_uploads(
    server_params: PyTree,
    client_params: PyTree,
    attackers: np.ndarray,
    kind: str,
    scale: float,
    key: jax.Array,
) -> PyTree:
    """``client_params`` [C, ...] with the rows where ``attackers`` [C] is True replaced
    by the attack ``kind`` (module docstring)."""
    if kind not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {kind!r}")
    bad = jnp.asarray(attackers, bool)
    if not bool(np.any(attackers)):
        return client_params
    leaves, treedef = jax.tree.flatten(client_params)
    servers = jax.tree.leaves(server_params)
    keys = jax.random.split(jax.random.fold_in(key, _ATTACK_STREAM), len(leaves))
    honest = jnp.maximum(jnp.sum(~bad), 1)

    def leaf(x, s, k):
        s = jnp.asarray(s, jnp.float32)[None]
        delta = jnp.asarray(x, jnp.float32) - s
        if kind == "sign_flip":
            poisoned = s - scale * delta
        elif kind == "scale":
            poisoned = s + scale * delta
        elif kind == "gaussian":
            poisoned = s + scale * jax.random.normal(k, delta.shape)
        elif kind == "nan":
            poisoned = jnp.full_like(delta, jnp.nan)
        else:  # shift_mean
            mask = (~bad).reshape((-1,) + (1,) * (delta.ndim - 1))
            mean = jnp.sum(jnp.where(mask, delta, 0.0), axis=0) / honest
            var = jnp.sum(jnp.where(mask, (delta - mean) ** 2, 0.0), axis=0) / honest
            poisoned = jnp.broadcast_to(s + mean - scale * jnp.sqrt(var), delta.shape)
        rows = bad.reshape((-1,) + (1,) * (delta.ndim - 1))
        return jnp.where(rows, poisoned, jnp.asarray(x, jnp.float32)).astype(x.dtype)

    return jax.tree.unflatten(treedef, [leaf(x, s, k) for x, s, k in zip(leaves, servers, keys)])


def simulate_faults(
    config: ml_collections.ConfigDict, params: PyTree, uploads: ClientUploads
) -> tuple[ClientUploads, list[int]]:
    """``uploads`` after ``config.fl``'s simulated faults (`fedsp.federated.faults`):
    the Byzantine clients' adapters poisoned, the clients that drop out removed; and the
    attackers among the uploads."""
    fl, rnd = config.fl, uploads.round
    clients = np.asarray(uploads.clients)
    attackers: list[int] = []
    if fl.byzantine.fraction > 0:
        bad = np.isin(
            clients, byzantine_clients(config.data.num_clients, fl.byzantine.fraction, config.seed)
        )
        attackers = [int(k) for k in clients[bad]]
        if attackers:
            key = jax.random.fold_in(jax.random.key(config.seed), rnd)
            poisoned = attack_uploads(
                params, uploads.params, bad, fl.byzantine.attack, fl.byzantine.scale, key
            )
            uploads = dataclasses.replace(uploads, params=poisoned)
    if fl.dropout > 0:
        back = returns(clients, fl.dropout, config.seed, rnd)
        if not back.all():
            idx = np.flatnonzero(back)
            uploads = dataclasses.replace(
                uploads,
                clients=clients[idx],
                params=jax.tree.map(lambda x: x[idx], uploads.params),
                stats={k: np.asarray(v)[idx] for k, v in uploads.stats.items()},
            )
            attackers = [k for k in attackers if k in set(clients[idx].tolist())]
    return uploads, attackers
