"""MATH competition problems (Hendrycks et al. 2021, arXiv 2103.03874) and MATH-500
(the 500-problem test subset of Lightman et al. 2023, arXiv 2305.20050).

Local: ``<data_dir>/math/{train,test}.jsonl`` (``unique_id``, ``problem``, ``level``,
``type``, ``solution``; the gold is the last ``\\boxed{}`` of the solution) and
``<data_dir>/math/math500_test.jsonl`` (adds ``answer``). Hub: ``EleutherAI/hendrycks_math``
(one config per subject) and ``HuggingFaceH4/MATH-500``.

Answers are compared after a light LaTeX normalisation, or as numbers when both parse
(`fedsp.data.answers.math_answers_equal`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fedsp.data import answers, sources
from fedsp.data.base import Example, FileTask, register_task
from fedsp.data.numeric import numeric_hints

__all__ = ["MATH", "SUBJECTS", "extract_math_answer"]

SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def extract_math_answer(text: str) -> str | None:
    """A MATH final answer, normalised (`fedsp.data.answers.normalize_math_answer`), or None.

    Order: the last ``\\boxed{}``; else the last declared answer (``Answer: x``, any
    surrounding ``$`` dropped); else the last number in the reply.
    """
    boxed = answers.last_boxed(text)
    if boxed is not None:
        return answers.normalize_math_answer(boxed)
    spans = [s for s in answers.declared_answers(text) if s]
    if spans:
        return answers.normalize_math_answer(spans[-1])
    value = answers.last_number(text)
    return None if value is None else answers.canonical_number(value)


@register_task("math")
class MATH(FileTask):
    """MATH: free-form LaTeX answers in ``\\boxed{}``. Splits: train, test, math500.

    Label: the subject ("Algebra", "Geometry", ...); ``meta["level"]`` is 1-5 (None for
    the two train items marked "Level ?"). ``gold_response`` is the reference solution.
    """

    splits = ("train", "test", "math500")
    files: ClassVar[Mapping[str, str]] = {
        "train": "math/train.jsonl",
        "test": "math/test.jsonl",
        "math500": "math/math500_test.jsonl",
    }
    hub_name = "EleutherAI/hendrycks_math and HuggingFaceH4/MATH-500"
    description = "Solve the math problem step by step."
    format_reminder = "Put your final answer in \\boxed{}."
    generic_hint = (
        "Re-check each step of your work, and put only the final answer inside \\boxed{}."
    )

    def _hub_records(self, split: str) -> list[dict[str, Any]]:
        if split == "math500":
            return sources.hub_dataset("HuggingFaceH4/MATH-500", None, "test")
        return [
            {**record, "unique_id": f"hub/{split}/{subject}/{i}"}
            for subject in SUBJECTS
            for i, record in enumerate(
                sources.hub_dataset("EleutherAI/hendrycks_math", subject, split)
            )
        ]

    def _to_example(self, record: Mapping[str, Any], split: str, index: int) -> Example:
        gold = record.get("answer") or answers.last_boxed(record["solution"])
        if gold is None:
            raise ValueError(
                f"math {split} item {record.get('unique_id', index)}: no \\boxed{{}} answer"
            )
        level = str(record.get("level", ""))
        digits = level.removeprefix("Level ").strip()
        return Example(
            uid=record.get("unique_id") or f"math/{split}/{index}",
            question=record["problem"],
            answer=gold,
            label=str(record.get("type") or record.get("subject")),
            gold_response=record["solution"],
            meta={"level": int(digits) if digits.isdigit() else None},
        )

    def extract_answer(self, text: str) -> str | None:
        """`extract_math_answer`: last boxed > last declared > last number."""
        return extract_math_answer(text)

    def is_correct(self, text: str, example: Example) -> bool:
        predicted = self.extract_answer(text)
        return predicted is not None and answers.math_answers_equal(predicted, example.answer)

    def hints(self, example: Example, response: str) -> list[str]:
        """Too high / too low when both answers are numbers; else nothing specific."""
        predicted = self.extract_answer(response)
        if predicted is None:
            return [f"I could not find your final answer. {self.format_reminder}"]
        gold = answers.normalize_math_answer(example.answer)
        if answers.parse_number(predicted) is None or answers.parse_number(gold) is None:
            return []
        return numeric_hints(predicted, gold, self.format_reminder)
