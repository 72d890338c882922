"""The server side of a round: reject broken updates, weight clients, step the server.

Privacy invariant (docs/design.md): the server sees adapter states and scalar statistics,
never text. `server_step` enforces it at its door: every leaf of every argument must be
an array or a number (`check_arrays_only`), so a prompt, completion or feedback string
that strayed into a client's stats raises instead of reaching the server.

One round (Reddi et al. 2021, with FedAvg as the lr = 1 special case):

    finite_k = every leaf of θ_k and n_k is finite        (else client k is rejected)
    (w, keep) = client_weights(n ⊙ finite, adv, mode, T, threshold)
    θ̄         = Σ_k w_k θ_k, or a robust aggregate of the kept clients (`RobustSettings`:
                trimmed mean, median, Krum, Multi-Krum, norm-bounded mean; `fedsp.core.robust`)
    θ_{r+1}   = θ_r + server_opt(θ_r − θ̄)                 (skipped when Σ w = 0)

A rejected client's parameters are replaced by θ_r before the weighted mean, so its
NaN/inf cannot leak through a 0 weight (0 · NaN = NaN).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from fedsp.core.aggregation import server_update
from fedsp.core.privacy import calibrate_noise, dp_mean
from fedsp.core.robust import robust_aggregate
from fedsp.core.weighting import client_weights

__all__ = [
    "DpSettings",
    "RobustSettings",
    "accounting_sampling",
    "check_arrays_only",
    "finite_client_weights",
    "server_step",
    "tree_bytes",
]

PyTree = Any


def check_arrays_only(name: str, tree: PyTree) -> None:
    """Raises ``TypeError`` if any leaf of ``tree`` is not an array or a number.

    Strings (and bytes, or any other object) in a server input would mean client text
    crossed to the server.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (str, bytes)) or not isinstance(
            leaf, (jax.Array, np.ndarray, np.generic, numbers.Number)
        ):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}; the server "
                "accepts only arrays and numbers (no client text may reach it)"
            )


def tree_bytes(tree: PyTree) -> int:
    """Bytes of all array leaves of ``tree`` (what one client would transmit)."""
    return int(
        sum(
            np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape))
            for leaf in jax.tree.leaves(tree)
        )
    )


@dataclasses.dataclass(frozen=True)
class RobustSettings:
    """The aggregator of the kept clients (``config.fl``'s ``aggregator``,
    ``trim_fraction``, ``krum_byzantine``, ``multi_krum_keep``, ``norm_bound``; see
    `fedsp.core.robust`)."""

    name: str = "mean"
    trim_fraction: float = 0.1
    krum_byzantine: int = 0
    multi_krum_keep: int = 2
    norm_bound: float = 1.0

    @classmethod
    def from_config(cls, fl: Any) -> RobustSettings:
        return cls(
            name=fl.aggregator,
            trim_fraction=float(fl.trim_fraction),
            krum_byzantine=int(fl.krum_byzantine),
            multi_krum_keep=int(fl.multi_krum_keep),
            norm_bound=float(fl.norm_bound),
        )


@dataclasses.dataclass(frozen=True)
class DpSettings:
    """DP-FedAvg in the server step (`fedsp.core.privacy.dp_mean`): the clip norm C, the
    noise multiplier z in effect and the fixed denominator (clients per round: with
    Poisson sampling the expected number of clients, q·N)."""

    clip_norm: float
    noise_multiplier: float
    denominator: float

    @classmethod
    def from_config(cls, config: Any) -> DpSettings | None:
        """``config.fl.dp``'s settings (z calibrated to ``target_epsilon`` over
        ``fl.rounds`` and the run's ``fl.sampling`` when that is set), or None when
        ``clip_norm`` is 0 (DP off)."""
        fl, dp = config.fl, config.fl.dp
        if not dp.clip_norm:
            return None
        z = float(dp.noise_multiplier)
        if dp.target_epsilon is not None:
            z = _calibrated(
                float(dp.target_epsilon),
                int(fl.rounds),
                int(config.data.num_clients),
                int(fl.clients_per_round),
                float(dp.delta),
                accounting_sampling(fl.sampling),
            )
        return cls(float(dp.clip_norm), z, float(fl.clients_per_round))


def accounting_sampling(sampling: str) -> str:
    """The `fedsp.core.privacy` sampling of the client sampling ``fl.sampling`` names:
    "fixed" draws without replacement, "poisson" is Poisson sampling."""
    return {"fixed": "without_replacement", "poisson": "poisson"}[sampling]


@functools.cache
def _calibrated(
    target: float, rounds: int, num_clients: int, per_round: int, delta: float, sampling: str
):
    return calibrate_noise(
        target,
        rounds,
        num_clients=num_clients,
        clients_per_round=per_round,
        delta=delta,
        sampling=sampling,
    )


def _finite_per_client(stacked: PyTree) -> jax.Array:
    per_leaf = [
        jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
        for leaf in jax.tree.leaves(stacked)
    ]
    return functools.reduce(jnp.logical_and, per_leaf)


def finite_client_weights(
    num_examples: jax.Array,
    client_adv: jax.Array,
    finite: jax.Array,
    mode: str = "examples",
    temperature: float = 1.0,
    threshold: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`client_weights` of the round's clients, a rejected client (``finite`` False)
    counting as one with no examples and advantage 0: ``(weights, keep)``, each [C].
    The server step weights with it; `fedsp.flower` asks it whom to request uploads from."""
    counts = jnp.where(finite, num_examples, 0.0)
    adv = jnp.where(finite & jnp.isfinite(client_adv), client_adv, 0.0)
    return client_weights(counts, adv, mode, temperature, threshold)


# No buffer donation: θ_r stays in use after the step (the pool's newest player, DPO's
# reference in round 1, a replaced server step that returns it), and opt_state belongs to
# the caller's RoundState, which `run_round` leaves valid (a hook or a second call reads it).
@functools.partial(
    jax.jit, static_argnames=("optimizer", "mode", "temperature", "threshold", "robust", "dp")
)
def _server_step(
    server_params,
    opt_state,
    client_params,
    num_examples,
    client_adv,
    *,
    optimizer,
    mode,
    temperature,
    threshold,
    robust,
    dp,
    noise_key,
):
    finite = _finite_per_client(client_params) & jnp.isfinite(num_examples)
    sanitized = jax.tree.map(
        lambda c, s: jnp.where(finite.reshape((-1,) + (1,) * s.ndim), c, s[None]),
        client_params,
        server_params,
    )
    weights, keep = finite_client_weights(
        num_examples, client_adv, finite, mode, temperature, threshold
    )

    def aggregate(stacked, w):
        if dp is not None:
            return dp_mean(
                server_params,
                stacked,
                keep,
                clip_norm=dp.clip_norm,
                noise_multiplier=dp.noise_multiplier,
                denominator=dp.denominator,
                key=noise_key,
            )
        return robust_aggregate(
            robust.name,
            server_params,
            stacked,
            w,
            keep,
            trim_fraction=robust.trim_fraction,
            num_byzantine=robust.krum_byzantine,
            num_selected=robust.multi_krum_keep,
            norm_bound=robust.norm_bound,
        )

    plain = dp is None and robust.name == "mean"
    new_params, new_state, metrics = server_update(
        server_params, opt_state, sanitized, weights, optimizer, None if plain else aggregate
    )
    return new_params, new_state, dict(metrics, weights=weights, keep=keep, finite=finite)


def server_step(
    server_params: PyTree,
    opt_state: optax.OptState,
    client_params: PyTree,
    num_examples: ArrayLike,
    client_adv: ArrayLike,
    *,
    optimizer: optax.GradientTransformation,
    mode: str = "examples",
    temperature: float = 1.0,
    threshold: float | None = None,
    robust: RobustSettings | None = None,
    dp: DpSettings | None = None,
    noise_key: jax.Array | None = None,
) -> tuple[PyTree, optax.OptState, dict[str, jax.Array]]:
    """One server round over C client updates; arrays and numbers in, arrays out.

    Args:
      server_params: θ_r, the global adapters.
      opt_state: the server optimizer's state.
      client_params: the clients' adapters after local training, leaves [C, ...].
      num_examples: [C] training examples per client (0: the client trained on nothing).
      client_adv: [C] client advantages for "advantage" weighting and pruning.
      optimizer: the server optimizer (`fedsp.core.aggregation.server_optimizer`).
      mode: client weighting, one of `fedsp.core.weighting.CLIENT_WEIGHT_MODES`.
      temperature: advantage temperature of the "advantage" mode.
      threshold: prune clients whose advantage is below it; None keeps all.
      robust: how the kept clients are combined (`RobustSettings`); None: the weighted
        mean.
      dp: DP-FedAvg (`DpSettings`): the kept clients' clipped changes, each with weight
        1, plus Gaussian noise drawn from ``noise_key``, over a fixed denominator; it
        replaces ``robust``.

    Returns:
      ``(θ_{r+1}, opt_state', diagnostics)``: diagnostics holds ``weights`` [C],
      ``keep`` [C] (kept: finite and not pruned), ``finite`` [C] (False: rejected for a
      NaN/inf update) and ``pseudo_grad_norm``, ``update_norm``, ``total_weight``,
      ``applied`` (0.0 when no client was kept and the step was skipped).

    Raises:
      TypeError: an argument holds a non-array leaf (e.g. text).
    """
    for name, tree in (
        ("server_params", server_params),
        ("opt_state", opt_state),
        ("client_params", client_params),
        ("num_examples", num_examples),
        ("client_adv", client_adv),
    ):
        check_arrays_only(name, tree)
    return _server_step(
        server_params,
        opt_state,
        client_params,
        jnp.asarray(num_examples, jnp.float32),
        jnp.asarray(client_adv, jnp.float32),
        optimizer=optimizer,
        mode=mode,
        temperature=float(temperature),
        threshold=None if threshold is None else float(threshold),
        robust=robust or RobustSettings(),
        dp=dp,
        noise_key=_noise_key(dp, noise_key),
    )


def _noise_key(dp: DpSettings | None, key: jax.Array | None) -> jax.Array:
    if dp is None:
        return jax.random.key(0)  # unused
    if key is None:
        raise ValueError("server_step with dp needs a noise_key")
    return key
