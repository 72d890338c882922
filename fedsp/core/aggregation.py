"""Server-side aggregation of client updates: weighted means, server optimizers, robustness.

Every function takes pytrees of arrays whose leaves carry a leading client axis C where
noted (``[C, ...]``, the layout `fedsp.federated.mapping.map_clients` returns), and is
pure and jit-safe. Sums over clients are accumulated in float32 (float64 stays float64),
then cast back to each leaf's dtype, so bfloat16 adapters average without the ~3-digit
rounding of a bfloat16 sum.

The server step follows Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR):
the server treats the pseudo-gradient

    g = θ_r − Σ_k w_k θ_k / Σ_k w_k

as a gradient and feeds it to a server optimizer (FedAvg, FedAvgM, FedAdam, FedYogi),
written here as optax transformations, so that ``optax.apply_updates(θ_r, updates)``
gives θ_{r+1} and any optax transform (clipping, schedules) chains with them. FedAvg
with lr = 1 is exactly the weighted mean of the client parameters (McMahan et al. 2017).

Robust and private aggregation: global-norm clipping of an update (`clip_update`), the
coordinate-wise trimmed mean (`trimmed_mean`, Yin et al. 2018) and Gaussian noise for
DP-FedAvg (`dp_noise`, McMahan et al. 2018).
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedsp.core import checks

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")

PyTree = Any


def _leaves_with_paths(tree: PyTree) -> list[tuple[str, jax.Array]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def _num_clients(name: str, stacked_tree: PyTree) -> int:
    """The size C of the leading client axis shared by every leaf of ``stacked_tree``."""
    leaves = _leaves_with_paths(stacked_tree)
    if not leaves:
        raise ValueError(
            f"{name} must contain at least one array with a leading client axis [C, ...]"
        )
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape:
            raise ValueError(f"{name}{path} must have a leading client axis [C, ...], got a scalar")
        sizes[path] = shape[0]
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"{name}{p}: {c}" for p, c in sizes.items())
        raise ValueError(f"{name} leaves must share one leading client axis C, got {listing}")
    return next(iter(sizes.values()))


def _check_weights(weights: jax.Array, num_clients: int, tree_name: str) -> None:
    shape = tuple(jnp.shape(weights))
    if shape != (num_clients,):
        raise ValueError(
            f"weights must have shape [C] = [{num_clients}] to match the client axis of "
            f"{tree_name}, got {shape}"
        )


def _check_stacked_like(server_params: PyTree, client_params: PyTree) -> int:
    """Checks client_params = server_params with a leading [C] on every leaf; returns C."""
    server_def = jax.tree.structure(server_params)
    client_def = jax.tree.structure(client_params)
    # jax annotates structure() with jaxlib's PyTreeDef, a C-extension type without stubs
    # that mypy cannot resolve.
    if server_def != client_def:  # type: ignore[operator]
        raise ValueError(
            "client_params must have the tree structure of server_params, got "
            f"{client_def} and {server_def}"
        )
    num_clients = _num_clients("client_params", client_params)
    for (path, server), (_, client) in zip(
        _leaves_with_paths(server_params), _leaves_with_paths(client_params)
    ):
        want = (num_clients, *jnp.shape(server))
        if tuple(jnp.shape(client)) != want:
            raise ValueError(
                f"client_params{path} must have shape [C, ...] = {want} (server_params{path} "
                f"stacked over C = {num_clients} clients), got {tuple(jnp.shape(client))}"
            )
    return num_clients


def _weighted_mean_upcast(stacked_tree: PyTree, weights: jax.Array) -> tuple[PyTree, jax.Array]:
    """Weighted mean over axis 0 in float32 (or wider); returns (mean tree, Σ weights)."""
    weights = checks.upcast_float(weights)
    total = jnp.sum(weights)
    # Every client pruned (Σ w = 0): divide by 1 instead of 0, so the mean is all zeros
    # rather than NaN; `server_update` then keeps the server parameters unchanged.
    scale = weights / jnp.where(total != 0, total, 1)

    def leaf_mean(x: jax.Array) -> jax.Array:
        x = checks.upcast_float(x)
        s = scale.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        # A select, not a product: a pruned client (w = 0) whose training diverged must
        # not poison the mean through 0 · NaN = NaN.
        return jnp.sum(jnp.where(s != 0, s * x, 0), axis=0)

    return jax.tree.map(leaf_mean, stacked_tree), total


def _cast_like(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda x, ref: x.astype(jnp.result_type(ref)), tree, like)


def _global_norm(tree: PyTree) -> jax.Array:
    squares = [jnp.sum(jnp.square(checks.upcast_float(x))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares, jnp.zeros([], jnp.float32)))


def weighted_mean(stacked_tree: PyTree, weights: jax.Array) -> PyTree:
    """Weighted mean over the client axis: Σ_k w_k x_k / Σ_k w_k, leaf by leaf.

    Weights need not be normalized. Clients with w_k = 0 (pruned, e.g. by
    `fedsp.core.weighting.client_weights`) are excluded exactly, even if their leaves
    hold NaN or inf. If every weight is 0 the result is all zeros (the division is
    guarded so that the function stays jit-safe); `server_update` detects that case and
    skips the server step.

    Args:
      stacked_tree: pytree whose leaves are [C, ...] arrays (any float dtype).
      weights: [C] non-negative client weights.

    Returns:
      A pytree like one client's slice: leaves [...] in their original dtype, computed
      in float32 (float64 under x64).

    Raises:
      ValueError: if the leaves do not share a leading axis C or ``weights`` is not [C].
    """
    num_clients = _num_clients("stacked_tree", stacked_tree)
    _check_weights(weights, num_clients, "stacked_tree")
    mean, _ = _weighted_mean_upcast(stacked_tree, weights)
    return jax.tree.map(lambda m, x: m.astype(jnp.result_type(x)), mean, stacked_tree)


def fedavg(server_params: PyTree, client_params: PyTree, weights: jax.Array) -> PyTree:
    """FedAvg aggregation (McMahan et al. 2017): θ_{r+1} = Σ_k w_k θ_k / Σ_k w_k.

    Args:
      server_params: the current global parameters θ_r; they fix the expected tree
        structure, shapes and output dtypes.
      client_params: the same tree with every leaf stacked over clients, [C, ...].
      weights: [C] non-negative client weights (e.g. example counts).

    Returns:
      The weighted mean of the client parameters, with the dtypes of ``server_params``.

    Raises:
      ValueError: if ``client_params`` is not ``server_params`` stacked over one C, or
        ``weights`` is not [C].
    """
    num_clients = _check_stacked_like(server_params, client_params)
    _check_weights(weights, num_clients, "client_params")
    mean, _ = _weighted_mean_upcast(client_params, weights)
    return _cast_like(mean, server_params)


def pseudo_gradient(server_params: PyTree, aggregated_params: PyTree) -> PyTree:
    """The server pseudo-gradient g = θ_r − θ̄ (Reddi et al. 2021, Algorithm 2).

    A descent step −lr·g moves θ_r towards the client average θ̄. The difference is
    returned in float32 (float64 under x64): two nearby bfloat16 numbers differ by far
    less than a bfloat16 ulp of either.

    Args:
      server_params: θ_r, a pytree of arrays.
      aggregated_params: θ̄, the same tree (e.g. from `weighted_mean` or `trimmed_mean`).

    Returns:
      The pytree θ_r − θ̄, in float32 or wider.
    """
    return jax.tree.map(
        lambda s, a: checks.upcast_float(s) - checks.upcast_float(a),
        server_params,
        aggregated_params,
    )


class ServerMomentumState(NamedTuple):
    """State of `scale_by_server_momentum`: the momentum buffer m (float32 or wider)."""

    momentum: optax.Updates


class FedAdaptiveState(NamedTuple):
    """State of `scale_by_fedadam` / `scale_by_fedyogi`: first and second moments."""

    mu: optax.Updates
    nu: optax.Updates


def _zeros_upcast(params: PyTree, fill: float = 0.0) -> PyTree:
    return jax.tree.map(
        lambda p: jnp.full(jnp.shape(p), fill, jnp.promote_types(jnp.result_type(p), jnp.float32)),
        params,
    )


def scale_by_server_momentum(b1: float = 0.9) -> optax.GradientTransformation:
    """FedAvgM direction (Hsu et al. 2019): m ← b1·m + g; emits m.

    The momentum is heavy-ball style (no (1 − b1) damping), as in Reddi et al. 2021.
    Chain with a learning-rate scale: `server_optimizer("fedavgm", lr, b1)`.

    Args:
      b1: momentum decay in [0, 1].

    Returns:
      An optax transformation with state `ServerMomentumState`; updates in float32.
    """
    checks.check_interval("b1", b1, 0.0, 1.0)

    def init_fn(params: optax.Params) -> ServerMomentumState:
        return ServerMomentumState(momentum=_zeros_upcast(params))

    def update_fn(
        updates: optax.Updates, state: ServerMomentumState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ServerMomentumState]:
        del params
        momentum = jax.tree.map(
            lambda m, g: b1 * m + checks.upcast_float(g), state.momentum, updates
        )
        return momentum, ServerMomentumState(momentum=momentum)

    return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_fed_adaptive(
    b1: float, b2: float, tau: float, v0: float | None, yogi: bool
) -> optax.GradientTransformation:
    checks.check_interval("b1", b1, 0.0, 1.0)
    checks.check_interval("b2", b2, 0.0, 1.0)
    checks.check_interval("tau", tau, 0.0, None, low_open=True)
    if v0 is not None:
        checks.check_interval("v0", v0, 0.0, None)
    initial_nu = tau**2 if v0 is None else v0

    def init_fn(params: optax.Params) -> FedAdaptiveState:
        return FedAdaptiveState(mu=_zeros_upcast(params), nu=_zeros_upcast(params, initial_nu))

    def second_moment(v: jax.Array, g: jax.Array) -> jax.Array:
        g2 = jnp.square(g)
        if yogi:
            # Yogi's additive update moves v towards g² by at most (1 − b2)·g² per round,
            # so one outlier round cannot wipe out the accumulated scale.
            return v - (1 - b2) * g2 * jnp.sign(v - g2)
        return b2 * v + (1 - b2) * g2

    def update_fn(
        updates: optax.Updates, state: FedAdaptiveState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, FedAdaptiveState]:
        del params
        grads = jax.tree.map(checks.upcast_float, updates)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(second_moment, state.nu, grads)
        # No bias correction: Reddi et al. 2021 (Algorithm 2) use none, and tau keeps the
        # first rounds' steps bounded instead.
        direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
        return direction, FedAdaptiveState(mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_fedadam(
    b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3, v0: float | None = None
) -> optax.GradientTransformation:
    """FedAdam direction (Reddi et al. 2021): m/(√v + tau), no bias correction.

    m ← b1·m + (1 − b1)·g,  v ← b2·v + (1 − b2)·g².

    Args:
      b1: first-moment decay in [0, 1].
      b2: second-moment decay in [0, 1].
      tau: adaptivity (denominator offset) > 0.
      v0: initial second moment; None means tau² (as the SPEAR reference code), Flower
        uses 0.0. The first moment starts at 0.

    Returns:
      An optax transformation with state `FedAdaptiveState`; updates in float32.
    """
    return _scale_by_fed_adaptive(b1, b2, tau, v0, yogi=False)


def scale_by_fedyogi(
    b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3, v0: float | None = None
) -> optax.GradientTransformation:
    """FedYogi direction (Reddi et al. 2021): m/(√v + tau), no bias correction.

    m ← b1·m + (1 − b1)·g,  v ← v − (1 − b2)·g²·sign(v − g²).

    Args:
      b1, b2, tau, v0: as in `scale_by_fedadam`.

    Returns:
      An optax transformation with state `FedAdaptiveState`; updates in float32.
    """
    return _scale_by_fed_adaptive(b1, b2, tau, v0, yogi=True)


def server_optimizer(
    name: str,
    lr: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    v0: float | None = None,
) -> optax.GradientTransformation:
    """The server optimizer of Reddi et al. 2021, as an optax transformation.

    It is fed the pseudo-gradient g = θ_r − weighted_mean_k(θ_k) (`pseudo_gradient`)
    and its updates are applied with ``optax.apply_updates``:

    - "fedavg":  update = −lr·g (lr = 1 gives exactly the weighted FedAvg mean);
    - "fedavgm": m ← b1·m + g, update = −lr·m;
    - "fedadam": m ← b1·m + (1 − b1)·g, v ← b2·v + (1 − b2)·g²,
      update = −lr·m/(√v + tau);
    - "fedyogi": as fedadam with v ← v − (1 − b2)·g²·sign(v − g²).

    Args:
      name: one of `SERVER_OPTIMIZERS`.
      lr: server learning rate > 0, or an optax schedule of the round index.
      b1: first-moment (momentum) decay, used by fedavgm, fedadam, fedyogi.
      b2: second-moment decay, used by fedadam and fedyogi.
      tau: adaptivity > 0, used by fedadam and fedyogi.
      v0: initial second moment for fedadam/fedyogi; None means tau².

    Returns:
      An ``optax.GradientTransformation``; its state holds float32 moments.

    Raises:
      ValueError: for an unknown ``name`` (listing the choices) or an out-of-range
        hyper-parameter.
    """
    checks.check_choice("name", name, SERVER_OPTIMIZERS)
    checks.check_interval("lr", lr, 0.0, None, low_open=True)
    try:
        return _cached_server_optimizer(name, lr, b1, b2, tau, v0)
    except TypeError:  # an unhashable lr (schedule object): build it afresh
        return _build_server_optimizer(name, lr, b1, b2, tau, v0)


# The server step takes the optimizer as a static argument, so each new instance is a
# jit cache miss: equal settings share one instance (several runs in one process — tests,
# notebooks, grids — then compile the server step once).
@functools.lru_cache(maxsize=64)
def _cached_server_optimizer(name, lr, b1, b2, tau, v0):
    return _build_server_optimizer(name, lr, b1, b2, tau, v0)


def _build_server_optimizer(name, lr, b1, b2, tau, v0):
    step = optax.scale_by_learning_rate(lr)
    if name == "fedavg":
        return step
    if name == "fedavgm":
        return optax.chain(scale_by_server_momentum(b1), step)
    if name == "fedadam":
        return optax.chain(scale_by_fedadam(b1, b2, tau, v0), step)
    return optax.chain(scale_by_fedyogi(b1, b2, tau, v0), step)


def server_update(
    server_params: PyTree,
    opt_state: optax.OptState,
    client_params: PyTree,
    weights: jax.Array,
    optimizer: optax.GradientTransformation,
    aggregate: Callable[[PyTree, jax.Array], PyTree] | None = None,
) -> tuple[PyTree, optax.OptState, dict[str, jax.Array]]:
    """One server round: θ_{r+1} = θ_r + optimizer(θ_r − Σ_k w_k θ_k / Σ_k w_k).

    Pure and jit-able (pass ``optimizer`` as a closure or static argument). If every
    weight is 0 (all clients pruned) the round is skipped: parameters and optimizer
    state come back unchanged, so momentum is not decayed by an empty round.

    Args:
      server_params: θ_r, a pytree of arrays (e.g. the LoRA adapters).
      opt_state: ``optimizer.init(server_params)`` or the state of the previous round.
      client_params: the clients' parameters after local training, every leaf stacked
        [C, ...] over the clients of this round.
      weights: [C] non-negative client weights (unnormalized; 0 drops a client).
      optimizer: a server optimizer, e.g. ``server_optimizer("fedadam", 1e-2)``.
      aggregate: ``aggregate(client_params, weights) -> θ̄`` in place of the weighted
        mean (a robust aggregator, `fedsp.core.robust`); the round is still skipped when
        every weight is 0.

    Returns:
      ``(new_params, new_opt_state, metrics)``: new parameters with the dtypes of
      ``server_params``, and scalar float32 metrics ``pseudo_grad_norm`` (‖g‖₂),
      ``update_norm`` (‖θ_{r+1} − θ_r‖₂), ``total_weight`` (Σ_k w_k) and
      ``applied`` (1.0 if the step was taken, 0.0 if skipped).

    Raises:
      ValueError: if ``client_params`` is not ``server_params`` stacked over one C, or
        ``weights`` is not [C].
    """
    num_clients = _check_stacked_like(server_params, client_params)
    _check_weights(weights, num_clients, "client_params")
    mean, total = _weighted_mean_upcast(client_params, weights)
    if aggregate is not None:
        mean = aggregate(client_params, weights)
    grads = pseudo_gradient(server_params, mean)
    updates, stepped_state = optimizer.update(grads, opt_state, server_params)
    stepped_params = optax.apply_updates(server_params, updates)
    applied = total != 0
    new_params = jax.tree.map(lambda n, o: jnp.where(applied, n, o), stepped_params, server_params)
    new_state = jax.tree.map(lambda n, o: jnp.where(applied, n, o), stepped_state, opt_state)
    change = pseudo_gradient(new_params, server_params)
    metrics = {
        "pseudo_grad_norm": jnp.where(applied, _global_norm(grads), 0.0),
        "update_norm": _global_norm(change),
        "total_weight": total.astype(jnp.float32),
        "applied": applied.astype(jnp.float32),
    }
    return new_params, new_state, metrics


def clip_update(delta_tree: PyTree, max_norm: float) -> tuple[PyTree, jax.Array]:
    """Global L2-norm clipping: Δ · min(1, max_norm / ‖Δ‖₂).

    Bounds one client's influence on the aggregate (robust aggregation) and its
    sensitivity for the Gaussian mechanism (DP-FedAvg, McMahan et al. 2018). The norm
    is taken over all leaves together, in float32. For a stacked [C, ...] tree clip each
    client with ``jax.vmap(clip_update, in_axes=(0, None))``.

    Args:
      delta_tree: a pytree of update arrays (e.g. θ_k − θ_r).
      max_norm: the clipping radius > 0.

    Returns:
      ``(clipped_tree, norm)``: the clipped tree (original dtypes) and the float32
      global norm ‖Δ‖₂ before clipping (for logging and DP accounting).

    Raises:
      ValueError: if ``max_norm`` is a number ≤ 0.
    """
    checks.check_interval("max_norm", max_norm, 0.0, None, low_open=True)
    norm = _global_norm(delta_tree)
    scale = jnp.where(norm > max_norm, max_norm / jnp.where(norm > 0, norm, 1), 1.0)
    clipped = jax.tree.map(
        lambda x: (checks.upcast_float(x) * scale).astype(jnp.result_type(x)), delta_tree
    )
    return clipped, norm


def trimmed_mean(stacked_tree: PyTree, trim: int) -> PyTree:
    """Coordinate-wise trimmed mean over clients (Yin et al. 2018, "Byzantine-Robust
    Distributed Learning").

    For every coordinate, the ``trim`` largest and ``trim`` smallest client values are
    dropped and the remaining C − 2·trim are averaged (unweighted). trim = 0 is the
    plain mean. Pruned clients are not recognised here: select the kept clients before
    calling it.

    Args:
      stacked_tree: pytree whose leaves are [C, ...] arrays.
      trim: number of clients dropped at each end, an int with 0 ≤ 2·trim < C.

    Returns:
      A pytree of [...] leaves in their original dtypes (sorted and averaged in float32).

    Raises:
      ValueError: if the leaves do not share a leading axis C, or ``trim`` is not an
        int with 0 ≤ 2·trim < C.
    """
    num_clients = _num_clients("stacked_tree", stacked_tree)
    if not isinstance(trim, numbers.Integral) or isinstance(trim, bool):
        raise ValueError(f"trim must be an int count of clients, got {trim!r}")
    if trim < 0 or 2 * trim >= num_clients:
        raise ValueError(
            f"trim must satisfy 0 <= 2 * trim < C = {num_clients} clients, got trim = {trim}"
        )

    def leaf_mean(x: jax.Array) -> jax.Array:
        ordered = jnp.sort(checks.upcast_float(x), axis=0)
        kept = ordered[trim : num_clients - trim]
        return jnp.mean(kept, axis=0).astype(jnp.result_type(x))

    return jax.tree.map(leaf_mean, stacked_tree)


def dp_noise(tree: PyTree, stddev: float | jax.Array, key: jax.Array) -> PyTree:
    """Adds i.i.d. Gaussian noise N(0, stddev²) to every coordinate of ``tree``.

    Each leaf draws from its own key (``jax.random.split(key, num_leaves)``), so leaves
    of equal shape get independent noise; the same key gives the same noise. For
    DP-FedAvg (McMahan et al. 2018) clip each client's delta to S with `clip_update` and
    add noise of stddev z·S/Σ_k w_k to the weighted mean, z the noise multiplier.

    Args:
      tree: a pytree of float arrays.
      stddev: noise standard deviation ≥ 0 (0 returns ``tree`` unchanged).
      key: a JAX PRNG key.

    Returns:
      The noised tree, in the original dtypes (noise is drawn and added in float32).

    Raises:
      ValueError: if ``stddev`` is a negative number.
    """
    checks.check_interval("stddev", stddev, 0.0, None)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noised = []
    for leaf_key, x in zip(keys, leaves):
        upcast = checks.upcast_float(x)
        noise = jax.random.normal(leaf_key, jnp.shape(x), upcast.dtype)
        noised.append((upcast + stddev * noise).astype(jnp.result_type(x)))
    return jax.tree.unflatten(treedef, noised)
