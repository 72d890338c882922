"""Supervised data for SFT, SPIN and TPAW: (prompt messages, gold response) pairs, and
open-ended chat prompts that have no responses.

SPIN / TPAW play the gold response y⁺ against the model's own y⁻, so they need examples
with `Example.gold_response`: GSM8K train (question → reference rationale) is the default
source here; arithmetic, ARC, HellaSwag, StrategyQA and MATH also provide one. The
UltraChat evaluation prompts (`load_chat_prompts`) come without responses and serve only
as prompts (e.g. generation-only evaluation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from fedsp.data import sources
from fedsp.data.base import Example, Message, Task, subset

__all__ = ["CHAT_PROMPTS_URL", "chat_messages", "load_chat_prompts", "sft_pairs"]

_COMMIT = "1f613e1b8dfc6d1e3a02efb6905de608ed06645b"
CHAT_PROMPTS_URL = (
    f"https://raw.githubusercontent.com/thunlp/UltraChat/{_COMMIT}/data/ultra_eval.json"
)


def sft_pairs(task: Task, examples: Sequence[Example]) -> list[tuple[list[Message], str]]:
    """``(task.messages(example), example.gold_response)`` for every example.

    Raises:
      ValueError: ``examples`` is empty or some example has no ``gold_response`` (the
        message names the first such uid).
    """
    if not examples:
        raise ValueError("examples is empty: sft_pairs needs at least one example")
    missing = [ex.uid for ex in examples if not ex.gold_response]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(examples)} examples have no gold_response (first: "
            f"{missing[0]!r}); SFT/SPIN/TPAW need (prompt, gold response) pairs such as "
            f"get_task('gsm8k').load('train')"
        )
    # Every example has a gold_response (checked above); the filter narrows its type.
    return [(task.messages(ex), ex.gold_response) for ex in examples if ex.gold_response]


def load_chat_prompts(
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    source: str = "auto",
) -> list[Example]:
    """The 385 UltraChat evaluation prompts (prompts only: ``answer`` is "").

    ``label`` is the prompt class ("Vicuna", "Writing", "Commonsense", ...). Local file:
    ``<data_dir>/chat_prompts/ultrachat_ultra_eval.json``; online: the same file from
    github.com/thunlp/UltraChat through `datasets`' download manager. ``limit`` and
    ``seed`` select a subset as `Task.load` does.

    Raises:
      ValueError: ``limit`` < 1.
      DataNotFoundError: no local file and the download is impossible.
    """
    records, _ = sources.load_records(
        dataset="chat_prompts",
        split="test",
        relpath="chat_prompts/ultrachat_ultra_eval.json",
        read_local=sources.read_json,
        hub=lambda: sources.read_json(sources.hub_file(CHAT_PROMPTS_URL)),
        hub_name=f"github.com/thunlp/UltraChat@{_COMMIT[:8]} (via datasets.DownloadManager)",
        data_dir=data_dir,
        source=source,
    )
    examples = [
        Example(
            uid=f"chat_prompts/{i}", question=r["data"].strip(), answer="", label=r["class"].strip()
        )
        for i, r in enumerate(records)
    ]
    return subset(examples, limit, seed)


def chat_messages(example: Example) -> list[Message]:
    """A single user turn with the prompt, for the chat template."""
    return [{"role": "user", "content": example.question}]
