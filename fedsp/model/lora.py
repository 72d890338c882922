"""LoRA adapters for the stacked Llama-family decoder (Hu et al. 2021).

A targeted projection W becomes W + s·A B with A [in, r], B [r, out], s = alpha / r, as
PEFT computes it. A is drawn like PEFT's default (uniform ±1/sqrt(in)) and B is zero, so a
fresh adapter leaves the model's outputs unchanged. The adapters are ``nnx.LoRA`` modules
whose ``lora_a``/``lora_b`` are ``nnx.LoRAParam``; that state, and only that state, is
what clients train and send:

    graphdef, lora_state, base_state = split_lora(model)   # nnx.split(model, nnx.LoRAParam, ...)
    model = nnx.merge(graphdef, lora_state, base_state)

Layers are stacked (see ``fedsp.model.transformer``), so adapters are stacked too:
``lora_a`` is [L, in, r]. Restricting adapters to a subset of layers sets the per-layer
scale s of the other layers to 0: their A and B exist (B stays 0 and gets zero gradient,
so their deltas are exactly 0) but PEFT exports and configs list only the chosen layers.

``lora_hf_state_dict`` / ``lora_hf_config`` write PEFT's adapter format
(``adapter_model.safetensors`` + ``adapter_config.json``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fedsp.model.layers import lora_delta
from fedsp.model.transformer import Linear, Transformer, lora_weights, merged_kernel

# Projection name -> path inside a DecoderLayer.
LORA_TARGETS = {
    "q_proj": ("self_attn", "q_proj"),
    "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
_SHORT_NAMES = {name.removesuffix("_proj"): name for name in LORA_TARGETS}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and their size.

    Attributes:
      rank: r, the adapter rank.
      alpha: the scale numerator; the update is (alpha / r)·A B.
      targets: projection names among ``LORA_TARGETS`` ("q" is accepted for "q_proj").
      layers: indices of the layers that get adapters; None means all.
    """

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if isinstance(self.targets, str):
            raise ValueError(
                f"targets must be a sequence of names, got the string {self.targets!r}"
            )
        targets = tuple(_SHORT_NAMES.get(t, t) for t in self.targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets:
            raise ValueError(
                f"targets has unknown or no projection(s) {unknown}; expected a non-empty "
                f"subset of {tuple(LORA_TARGETS)}"
            )
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))

    @property
    def scaling(self) -> float:
        """s = alpha / rank."""
        return self.alpha / self.rank


class LoRAScale(nnx.Variable):
    """Per-layer LoRA scale s (alpha / r, or 0 on layers without an adapter); not trained."""


class LoRA(nnx.LoRA):
    """``nnx.LoRA`` with PEFT's scale: y = s · x A B (no base module).

    ``Linear`` passes these arrays to ``fedsp.model.layers.linear``, which adds the term
    to the base projection; called alone, the module computes the term by itself.

    Built from stacked values (``lora_a`` [L, in, r], ``lora_b`` [L, r, out], ``scale``
    [L]); inside the layer scan each layer sees its [in, r] / [r, out] / scalar slice.
    """

    def __init__(self, lora_a: jax.Array, lora_b: jax.Array, scale: jax.Array | np.ndarray):
        _, in_features, rank = lora_a.shape
        no_eager = {"eager_sharding": False}
        super().__init__(
            in_features,
            rank,
            lora_b.shape[-1],
            param_dtype=lora_a.dtype,
            a_initializer=lambda *_: lora_a,
            b_initializer=lambda *_: lora_b,
            rngs=nnx.Rngs(0),  # unused: the initializers return the given values
            a_metadata={"out_sharding": ("layers", "lora_in", "lora_rank"), **no_eager},
            b_metadata={"out_sharding": ("layers", "lora_rank", "lora_out"), **no_eager},
        )
        self.scale = LoRAScale(
            jnp.asarray(scale, jnp.float32), out_sharding=("layers",), **no_eager
        )

    # nnx.LoRA.__call__ also takes **kwargs, for a base module this class never has.
    def __call__(self, x: jax.Array) -> jax.Array:  # type: ignore[override]
        x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return lora_delta(x, a, b, self.scale[...].astype(x.dtype))


def apply_lora(
    model: Transformer, config: LoRAConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32
) -> Transformer:
    """Attaches fresh adapters to ``model`` in place (and returns it).

    Args:
      model: a Transformer without adapters.
      config: rank, alpha, targets and layers.
      rngs: draws A (B is zero).
      param_dtype: adapter dtype; float32 keeps small updates exact on a bf16 base.

    Raises:
      ValueError: the model already has adapters, or ``config.layers`` names a layer
        outside [0, L).
    """
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("model already has LoRA adapters; merge or remove them first")
    num_layers = model.config.num_hidden_layers
    layers = tuple(range(num_layers)) if config.layers is None else config.layers
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers={config.layers} has indices {bad} outside [0, {num_layers})")
    scales = np.zeros((num_layers,), np.float32)
    scales[list(layers)] = config.scaling

    linears = [target_linear(model, target) for target in config.targets]
    shapes = tuple((num_layers, lin.in_features, config.rank, lin.out_features) for lin in linears)
    values = _init_adapters(rngs.params(), shapes, jnp.dtype(param_dtype))
    for linear, (a, b) in zip(linears, values):
        linear.lora = LoRA(a, b, scales)
    model.lora_config = config
    return model


def _init_adapters(key: jax.Array, shapes: tuple[tuple[int, int, int, int], ...], dtype: Any):
    """(A, B) per target: A ~ U(±1/sqrt(in)) as PEFT's kaiming_uniform(a=√5), B = 0.

    A is drawn on the host by numpy seeded from ``key``: compiling JAX's threefry kernel
    for these shapes costs seconds on a small CPU, drawing them with numpy milliseconds.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    out = []
    for layers, fan_in, rank, fan_out in shapes:
        bound = 1.0 / np.sqrt(fan_in)
        a = rng.uniform(-bound, bound, size=(layers, fan_in, rank)).astype(np.float32)
        out.append((jnp.asarray(a, dtype), jnp.zeros((layers, rank, fan_out), dtype)))
    return out


def split_lora(model: Transformer) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, lora_state, base_state) = ``nnx.split(model, nnx.LoRAParam, ...)``.

    ``nnx.merge(graphdef, lora_state, base_state)`` rebuilds the model; a jitted function
    taking (lora_state, base_state) compiles once and runs with any adapter values.
    """
    graphdef, lora, *rest = nnx.split(model, nnx.LoRAParam, ...)
    (base,) = rest  # two filters: LoRAParam and "everything else"
    return graphdef, lora, base


def lora_state(model: Transformer) -> nnx.State:
    """The trainable, communicated adapter state (every ``nnx.LoRAParam``)."""
    return nnx.state(model, nnx.LoRAParam)


def merge_lora_into_base(model: Transformer) -> Transformer:
    """A copy of ``model`` with W ← W + s·A B folded in and the adapters removed.

    The copy computes the same function as ``model`` (up to float rounding) without the
    adapter matmuls; ``model`` itself is not modified.
    """
    merged = nnx.clone(model)
    config = merged.lora_config
    if config is None:
        return merged
    for target in config.targets:
        linear = target_linear(merged, target)
        linear.kernel.set_value(merged_kernel(linear))
        linear.lora = None
    merged.lora_config = None
    return merged


def lora_hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """Adapters in PEFT's naming and torch layout, only for layers that have one.

    ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` is A_iᵀ
    [r, in] and ``...lora_B.weight`` is B_iᵀ [out, r]; PEFT applies alpha / r at run time,
    as here, so no scale is folded in.
    """
    config = _require_lora(model)
    out: dict[str, np.ndarray] = {}
    for target in config.targets:
        a, b = (np.asarray(w) for w in adapter_weights(target_linear(model, target))[:2])
        module = ".".join(LORA_TARGETS[target])
        for i in _adapted_layers(model):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def lora_hf_config(
    model_or_lora_config: Transformer | LoRAConfig, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` dict for the adapters (or a LoRAConfig)."""
    if isinstance(model_or_lora_config, LoRAConfig):
        config, layers = model_or_lora_config, model_or_lora_config.layers
    else:
        config = _require_lora(model_or_lora_config)
        layers = config.layers
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(config.targets),
        "layers_to_transform": None if layers is None else list(layers),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def target_linear(model: Transformer, target: str) -> Linear:
    """The stacked ``Linear`` of projection ``target`` (a ``LORA_TARGETS`` name)."""
    module: Any = model.layers
    for name in LORA_TARGETS[target]:
        module = getattr(module, name)
    return module


def adapter_weights(linear: Linear) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A, B, scale) of ``linear``'s adapter; raises ValueError when it has none."""
    weights = lora_weights(linear)
    if weights is None:
        raise ValueError("this projection has no LoRA adapter; call apply_lora first")
    return weights


def _require_lora(model: Transformer) -> LoRAConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError("model has no LoRA adapters; call apply_lora first")
    return config


def _adapted_layers(model: Transformer) -> tuple[int, ...]:
    config = _require_lora(model)
    if config.layers is None:
        return tuple(range(model.config.num_hidden_layers))
    return config.layers
