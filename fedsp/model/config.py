"""Architecture hyper-parameters of the Llama-family decoders fedsp runs.

One frozen dataclass covers Llama 2/3/3.1/3.2, Qwen2/2.5, SmolLM/SmolLM2 and Mistral:
they share RMSNorm → GQA attention with RoPE → RMSNorm → SwiGLU MLP and differ only in
the fields below (q/k/v bias for Qwen2, tied embeddings for SmolLM2, the llama3 RoPE
frequency scaling for Llama 3.1/3.2, an optional sliding window for Mistral).

``ModelConfig.from_hf`` reads a Hugging Face ``config.json`` dict (both the transformers
v4 spelling, ``rope_theta`` + ``rope_scaling``, and the v5 spelling, ``rope_parameters``),
and ``to_hf`` writes one that ``transformers.AutoConfig`` loads back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# model_type -> the transformers class name written to "architectures".
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
# SmolLM/SmolLM2 checkpoints declare model_type "llama"; the alias is accepted on input.
_ALIASES = {"smollm": "llama", "smollm2": "llama"}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES) + tuple(_ALIASES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder-only LM.

    Attributes:
      vocab_size: number of token ids V.
      hidden_size: model width D.
      intermediate_size: SwiGLU width F.
      num_hidden_layers: number of decoder layers L.
      num_attention_heads: query heads H.
      num_key_value_heads: key/value heads K (GQA; H % K == 0).
      head_dim: per-head width; 0 (or None) means ``hidden_size // num_attention_heads``.
      rope_theta: RoPE base θ (inverse frequencies θ^(−2i/head_dim)).
      rope_scaling: HF rope-scaling dict or None. Supported ``rope_type``: "default",
        "linear" (``factor``) and "llama3" (``factor``, ``low_freq_factor``,
        ``high_freq_factor``, ``original_max_position_embeddings``).
      rms_norm_eps: ε of RMSNorm.
      tie_word_embeddings: the LM head reuses the token embedding (SmolLM2).
      attention_bias: q/k/v projections have a bias (Qwen2); o_proj never has one.
      max_position_embeddings: longest context the checkpoint was trained for.
      bos_token_id, eos_token_id: special ids from the checkpoint (eos may be several).
      model_type: "llama" | "qwen2" | "mistral" ("smollm"/"smollm2" normalise to "llama").
      sliding_window: Mistral's attention window (keys older than this many positions are
        masked); None means full causal attention.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    model_type: str = "llama"
    sliding_window: int | None = None

    def __post_init__(self):
        model_type = _ALIASES.get(self.model_type, self.model_type)
        if model_type not in _ARCHITECTURES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; expected one of "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        object.__setattr__(self, "model_type", model_type)
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.head_dim:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (RoPE), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)

    def __hash__(self) -> int:
        # rope_scaling is a dict; hash a frozen view so the config can be a jit static arg.
        fields = dataclasses.astuple(self)
        rope = None if self.rope_scaling is None else tuple(sorted(self.rope_scaling.items()))
        return hash((*fields[:8], rope, *fields[9:]))

    @property
    def num_query_groups(self) -> int:
        """Query heads per key/value head (H // K)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when unset)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` dict.

        Raises:
          ValueError: unknown ``model_type``, an activation other than SiLU, MLP bias,
            an unsupported rope type, or Qwen2's per-layer sliding window.
        """
        if "model_type" not in hf:
            raise ValueError(f"config has no 'model_type'; expected one of {SUPPORTED_MODEL_TYPES}")
        model_type = _ALIASES.get(hf["model_type"], hf["model_type"])
        if model_type not in _ARCHITECTURES:
            raise ValueError(
                f"model_type={hf['model_type']!r} is not supported; expected one of "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported; expected 'silu'")
        if hf.get("mlp_bias", False):
            raise ValueError("mlp_bias=True is not supported (no Llama-family checkpoint uses it)")
        # transformers v5 folds rope_theta into rope_parameters; v4 keeps rope_theta and
        # rope_scaling separate.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        sliding_window = None
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window", False):
            raise ValueError(
                "use_sliding_window=True (Qwen2 per-layer sliding window) is not supported"
            )
        # Qwen2 always has q/k/v bias; transformers' Qwen2Config has no field for it.
        attention_bias = True if model_type == "qwen2" else bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            num_key_value_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or 0,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            model_type=model_type,
            sliding_window=sliding_window,
        )

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.AutoConfig`` loads.

        Args:
          torch_dtype: the dtype of the exported weights ("float32" | "bfloat16" | ...).
        """
        rope = {"rope_type": "default"} if self.rope_scaling is None else dict(self.rope_scaling)
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: v5 reads rope_parameters, v4 reads rope_theta/rope_scaling.
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        elif self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            hf["use_sliding_window"] = False
        return hf


def _check_rope_scaling(rope_scaling: Mapping[str, Any]) -> None:
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling rope_type={rope_type!r} is not supported; expected one of "
            f"{SUPPORTED_ROPE_TYPES}"
        )
    required = {
        "default": (),
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }[rope_type]
    missing = [k for k in required if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of rope_type={rope_type!r} is missing {missing}")
