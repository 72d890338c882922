"""UltraChat 200k (Ding et al. 2023, arXiv 2305.14233) as (prompt, gold response) SFT data.

``HuggingFaceH4/ultrachat_200k`` on the Hugging Face hub (splits ``train_sft`` /
``test_sft``): each record holds a multi-turn dialogue; the example is its first user
turn with the first assistant reply as `Example.gold_response`, as in the SPIN reference
(uclaml/SPIN ``SPIN_iter0``: ``real`` = [user, assistant]), which trains on 50k of
``train_sft``. Online only: there is no local file (``source="hub"``), the records come
through `datasets`.

Open-ended chat has no checkable answer: `is_correct` is always False, so evaluate an
UltraChat run on another task (``eval.task``, e.g. arc_challenge as SPIN/TPAW report).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedsp.data import sources
from fedsp.data.base import Example, FileTask, Message, register_task

__all__ = ["UltraChat"]


@register_task("ultrachat")
class UltraChat(FileTask):
    """First turns of UltraChat 200k dialogues; label: the dialogue's number of turns."""

    splits = ("train_sft", "test_sft")
    files: ClassVar[Mapping[str, str]] = {}
    hub_name = "HuggingFaceH4/ultrachat_200k"
    description = "Reply to the user helpfully."
    format_reminder = ""
    generic_hint = "Re-read the request and answer it fully."

    def __init__(self, *, source: str = "hub", system_prompt: bool = False):
        super().__init__(source=source, system_prompt=system_prompt)

    def messages(
        self,
        example: Example,
        *,
        feedback: str | Sequence[str] | None = None,
        previous: str | Sequence[str] | None = None,
    ) -> list[Message]:
        """The user's turn alone (no task instruction), as the SPIN reference prompts."""
        if previous is None and feedback is None:
            return [{"role": "user", "content": example.question}]
        return super().messages(example, feedback=feedback, previous=previous)

    def _hub_records(self, split: str) -> list[dict[str, Any]]:
        return sources.hub_dataset("HuggingFaceH4/ultrachat_200k", None, split)

    def _to_example(self, record: Mapping[str, Any], split: str, index: int) -> Example:
        turns = record["messages"]
        reply = next((t["content"] for t in turns if t["role"] == "assistant"), None)
        if not reply:
            raise ValueError(f"ultrachat {split} record {index} has no assistant turn")
        return Example(
            uid=f"ultrachat/{split}/{record.get('prompt_id', index)}",
            question=record["prompt"],
            answer="",
            label=str(sum(t["role"] == "assistant" for t in turns)),
            gold_response=reply,
        )

    def extract_answer(self, text: str) -> str | None:
        del text
        return None

    def is_correct(self, text: str, example: Example) -> bool:
        del text, example
        return False
