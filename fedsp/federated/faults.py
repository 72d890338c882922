"""Simulated client faults for testing a federation's defences: clients that do not
return (dropout), clients that return too late (stragglers) and Byzantine clients that
send poisoned updates.

Every draw is a function of (seed, round, client) (a client's speed of (seed, client)),
never of which other clients were sampled, so a resumed run meets the same faults as an
uninterrupted one:

- dropout: a sampled client does not return in a round with probability ``p``;
- stragglers: the server waits ``deadline`` simulated seconds (``fl.straggler``; 0 waits
  for everyone). Every fedsp client does the same work in a round (``prompts_per_client``
  prompts, ``local.steps`` steps of ``local.batch_size`` rows: fixed shapes), so a round's
  work is one unit and client k's simulated time in round r is

    t_{r,k} = j_{r,k} / s_k,    s_k = exp(σ_s · z_k),    j_{r,k} = exp(σ_j · u_{r,k})

  with z_k, u_{r,k} ~ N(0, 1) drawn from (seed, client) and (seed, round, client),
  σ_s = ``speed_spread`` and σ_j = ``jitter``: log-normal speeds fixed per client (a slow
  device stays slow) and a per-round log-normal jitter, both of median 1, so one
  simulated second is the median client's round. A client with t_{r,k} > ``deadline``
  is a straggler: its update arrives after the server has moved on and is dropped, as a
  dropout's (a client that drops out is not also counted as a straggler);
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

Dropouts and stragglers depend on nothing a client computes, so `fedsp.run_round`
decides them (`arrivals`) before the round's work: only the clients that will arrive in
time roll out and train (those that will not would be work thrown away), and the record
names the others (``dropped``; ``stragglers`` among them). `simulate_faults` then
poisons the attackers among the uploads that arrived.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedsp.federated.state import ClientUploads

__all__ = [
    "ATTACKS",
    "Arrivals",
    "arrivals",
    "attack_uploads",
    "byzantine_clients",
    "client_speeds",
    "returns",
    "simulate_faults",
    "simulated_times",
]

PyTree = Any
ATTACKS = ("sign_flip", "scale", "gaussian", "nan", "shift_mean")
_ATTACK_STREAM = 0x4259
# Seed entries of the straggler draws, apart from dropout's (seed, round, client, 1) and
# the prompts' (seed, round, client).
_JITTER_STREAM = 2
_SPEED_STREAM = (0x5350, 3)


def returns(clients: np.ndarray, probability: float, seed: int, round: int) -> np.ndarray:
    """[C] bool: which of the round's ``clients`` return their update (each stays away
    with ``probability``, drawn from (seed, round, client))."""
    if probability <= 0:
        return np.ones(len(clients), bool)
    draws = [np.random.default_rng([seed, round, int(k), 1]).random() for k in clients]
    return np.asarray(draws) >= probability


def client_speeds(clients: np.ndarray, spread: float, seed: int) -> np.ndarray:
    """[C] the speeds s_k = exp(``spread`` · z_k) of ``clients``, z_k ~ N(0, 1) drawn from
    (seed, client): fixed for the whole run (module docstring); all 1 when ``spread``
    is 0."""
    if spread <= 0:
        return np.ones(len(clients))
    z = [
        np.random.default_rng([seed, _SPEED_STREAM[0], int(k), _SPEED_STREAM[1]]).standard_normal()
        for k in clients
    ]
    return np.exp(spread * np.asarray(z, np.float64))


def simulated_times(
    clients: np.ndarray, speed_spread: float, jitter: float, seed: int, round: int
) -> np.ndarray:
    """[C] the simulated seconds t_{r,k} = j_{r,k} / s_k that ``clients`` take for round
    ``round``'s work (module docstring)."""
    times = 1.0 / client_speeds(clients, speed_spread, seed)
    if jitter > 0:
        u = [
            np.random.default_rng([seed, round, int(k), _JITTER_STREAM]).standard_normal()
            for k in clients
        ]
        times = times * np.exp(jitter * np.asarray(u, np.float64))
    return times


class Arrivals(NamedTuple):
    """Which of a round's sampled clients deliver their update in time (`arrivals`).

    Attributes:
      returns: [C] bool, True for a client whose update reaches the server in time.
      dropouts: the clients that do not return at all (``fl.dropout``).
      stragglers: the clients that return after the deadline (not dropouts).
      times: [C] the clients' simulated seconds (`simulated_times`); None without a
        deadline.
      wait: the simulated seconds the server waits: the deadline when a client is
        missing, else the slowest client's time; None without a deadline.
    """

    returns: np.ndarray
    dropouts: list[int]
    stragglers: list[int]
    times: np.ndarray | None = None
    wait: float | None = None


def arrivals(config: ml_collections.ConfigDict, clients: np.ndarray, round: int) -> Arrivals:
    """Which of round ``round``'s sampled ``clients`` deliver in time, by ``config.fl``'s
    ``dropout`` and ``straggler`` settings (module docstring)."""
    fl, seed = config.fl, config.seed
    clients = np.asarray(clients, np.int64)
    back = returns(clients, fl.dropout, seed, round)
    dropouts = [int(k) for k in clients[~back]]
    deadline = float(fl.straggler.deadline)
    if deadline <= 0:
        return Arrivals(back, dropouts, [])
    times = simulated_times(clients, fl.straggler.speed_spread, fl.straggler.jitter, seed, round)
    late = back & (times > deadline)
    on_time = back & ~late
    wait = deadline if not on_time.all() else float(times.max(initial=0.0))
    return Arrivals(on_time, dropouts, [int(k) for k in clients[late]], times, wait)


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
    """``uploads`` after ``config.fl``'s simulated faults (module docstring): the clients
    that do not arrive in time (`arrivals`: dropouts and stragglers) removed, then the
    Byzantine clients' adapters among the rest poisoned; and those attackers.

    Removing is idempotent: `fedsp.run_round` has already left out the clients that do
    not arrive, so there it only poisons."""
    fl, rnd = config.fl, uploads.round
    clients = np.asarray(uploads.clients)
    back = arrivals(config, clients, rnd).returns
    if not back.all():
        idx = np.flatnonzero(back)
        clients = clients[idx]
        uploads = dataclasses.replace(
            uploads,
            clients=clients,
            params=jax.tree.map(lambda x: x[idx], uploads.params),
            stats={k: np.asarray(v)[idx] for k, v in uploads.stats.items()},
        )
    attackers: list[int] = []
    if fl.byzantine.fraction > 0 and len(clients):
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
    return uploads, attackers
