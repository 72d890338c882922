"""Client-algorithm hyper-parameters read from a validated config, and the per-round LR.

`HParams` has no defaults of its own: `HParams.from_config` reads the fields of a
config built from `fedsp.config.default_config` (the one schema, with the one set of
defaults and bounds) after `fedsp.config.validate` has checked them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

# The SPEAR reference never lets unlikelihood touch the answer marker: every completion,
# right or wrong, must write it (spear.py, `_ul_format_protect_ids`). The default of
# ``algorithm.protected_strings``.
DEFAULT_PROTECTED_STRINGS = (
    "Answer:",
    " Answer:",
    "Answer: ",
    " Answer: ",
    "Answer",
    " Answer",
    "answer:",
    " answer:",
    "answer",
    " answer",
)
REWARDS = ("verdict", "score")


@dataclasses.dataclass(frozen=True)
class HParams:
    """Client-algorithm hyper-parameters (hashable: a static argument of the jitted step).

    Fields are ``config.algorithm.*`` (``max_revisions`` … ``protected_strings``),
    ``config.local.*`` (``steps`` … ``max_len``; ``max_grad_norm`` 0 = no clipping,
    ``micro_batch_size`` 0 = no gradient accumulation) and ``config.fl.rounds`` (the LR
    schedule's length).
    """

    max_revisions: int
    lambda_win: float
    lambda_lose: float
    margin: float
    tail_tokens: int
    rho: float
    group_size: int
    clip_eps: float
    kl_coef: float
    awr_temperature: float
    awr_max_weight: float
    baseline_decay: float
    reward: str
    protected_strings: tuple[str, ...]
    steps: int
    batch_size: int
    micro_batch_size: int
    lr: float
    lr_min: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    max_len: int
    rounds: int

    @classmethod
    def from_config(cls, config: Any) -> HParams:
        """Reads ``config.algorithm``, ``config.local`` and ``config.fl.rounds`` of a
        validated `fedsp.config.default_config` config."""
        a, local = config.algorithm, config.local
        return cls(
            max_revisions=int(a.max_revisions),
            lambda_win=float(a.lambda_win),
            lambda_lose=float(a.lambda_lose),
            margin=float(a.margin),
            tail_tokens=int(a.tail_tokens),
            rho=float(a.rho),
            group_size=int(a.group_size),
            clip_eps=float(a.clip_eps),
            kl_coef=float(a.kl_coef),
            awr_temperature=float(a.awr_temperature),
            awr_max_weight=float(a.awr_max_weight),
            baseline_decay=float(a.baseline_decay),
            reward=str(a.reward),
            protected_strings=tuple(a.protected_strings),
            steps=int(local.steps),
            batch_size=int(local.batch_size),
            micro_batch_size=int(local.micro_batch_size),
            lr=float(local.lr),
            lr_min=float(local.lr_min),
            warmup_ratio=float(local.warmup_ratio),
            weight_decay=float(local.weight_decay),
            max_grad_norm=float(local.max_grad_norm),
            max_len=int(local.max_len),
            rounds=int(config.fl.rounds),
        )

    @property
    def micro_batches(self) -> int:
        """Forward/backward passes per local step: ``batch_size / micro_batch_size``
        (the SPEAR reference's ``grad_accum_steps``), 1 without accumulation.

        Raises:
          ValueError: ``micro_batch_size`` does not divide ``batch_size``.
        """
        if self.micro_batch_size <= 0:
            return 1
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"local.micro_batch_size: {self.micro_batch_size} does not divide "
                f"local.batch_size = {self.batch_size}"
            )
        return self.batch_size // self.micro_batch_size

    def static(self) -> HParams:
        """These hyper-parameters with the host-only fields (LR schedule, rollout-side
        settings) set to fixed values: the jitted local step is keyed on what it reads,
        so runs that differ only in those fields share one executable (the round's LR is
        a traced argument). ``micro_batch_size`` = ``batch_size`` becomes 0: one pass
        either way."""
        micro = self.micro_batch_size if self.micro_batches > 1 else 0
        return dataclasses.replace(self, **_HOST_ONLY, micro_batch_size=micro)


# What `HParams.static` puts in the fields the jitted local step never reads.
_HOST_ONLY: dict[str, Any] = dict(
    max_revisions=0,
    rho=0.0,
    group_size=1,
    awr_temperature=0.0,
    awr_max_weight=1.0,
    baseline_decay=0.0,
    reward=REWARDS[0],
    protected_strings=(),
    tail_tokens=0,
    lr=0.0,
    lr_min=0.0,
    warmup_ratio=0.0,
    max_len=0,
    rounds=0,
)


def round_lr_schedule(
    rounds: int, peak: float, minimum: float, warmup_ratio: float
) -> optax.Schedule:
    """The SPEAR reference's per-round LR (``_cosine_lr``) as an optax schedule of the round.

    With W = int(warmup_ratio · R): lr(r) = peak · r / W for r ≤ W, then
    minimum + (peak − minimum) · ½(1 + cos(π (r − W) / (R − W))). Rounds are 1-based as in
    the reference (round 0 would get lr 0); the LR is constant within a round.
    """
    warmup = int(warmup_ratio * rounds)
    cosine = optax.cosine_decay_schedule(
        peak, max(1, rounds - warmup), alpha=minimum / peak if peak else 0.0
    )
    if warmup == 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), cosine], [warmup])


# `round` (shadowing the builtin) is the papers' word.
def round_lr(hp: HParams, round: int) -> float:
    """`round_lr_schedule` of ``hp`` at ``round``."""
    return float(round_lr_schedule(hp.rounds, hp.lr, hp.lr_min, hp.warmup_ratio)(round))
