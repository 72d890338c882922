"""GSM8K grade-school math word problems (Cobbe et al. 2021, arXiv 2110.14168).

Local files: ``<data_dir>/gsm8k/{train,test}.jsonl`` (``question``, ``answer`` = rationale
with ``<<expr=result>>`` calculator annotations and a final ``#### n`` line). Hub:
``openai/gsm8k``, config ``main``, same schema.

The train split doubles as the (prompt, gold response) data for SFT / SPIN / TPAW:
`Example.gold_response` is the rationale without annotations, ending ``Answer: n``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from fedsp.data import answers, sources
from fedsp.data.base import Example, FileTask, register_task
from fedsp.data.numeric import NumericAnswers

__all__ = ["GSM8K"]

_CALC_RE = re.compile(r"<<([^<>=]+)=([^<>=]+)>>")
_OPERATOR_RE = re.compile(r"(?<=[\d)])\s*([-+*/])\s*(?=[\d(.])")


@register_task("gsm8k")
class GSM8K(NumericAnswers, FileTask):
    """GSM8K: free-form numeric answers judged by exact numeric equality.

    Label: the number of reasoning lines in the reference solution ("1", "2", ...), a
    difficulty key for non-IID partitions. ``meta["solution"]`` keeps the annotated
    reference solution, ``meta["steps"]`` its calculator steps as (expression, value).
    """

    splits = ("train", "test")
    files: ClassVar[Mapping[str, str]] = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
    hub_name = "openai/gsm8k (config main)"
    description = "Solve the math word problem step by step."
    generic_hint = "Re-read the question and re-check each step of your calculation."

    def _hub_records(self, split: str) -> list[dict[str, Any]]:
        return sources.hub_dataset("openai/gsm8k", "main", split)

    def _to_example(self, record: Mapping[str, Any], split: str, index: int) -> Example:
        solution = record["answer"]
        reasoning, _, final = solution.rpartition("####")
        gold = answers.parse_number(final)
        if gold is None:
            raise ValueError(
                f"gsm8k {split} record {index}: no '#### <number>' line in {solution!r}"
            )
        gold_text = answers.canonical_number(gold)
        lines = [
            line.strip()
            for line in _CALC_RE.sub("", reasoning).strip().splitlines()
            if line.strip()
        ]
        return Example(
            uid=f"gsm8k/{split}/{index}",
            question=record["question"],
            answer=gold_text,
            label=str(len(lines)),
            gold_response="\n".join([*lines, f"Answer: {gold_text}"]),
            meta={
                "solution": solution,
                "steps": tuple(
                    (_spaced(expr), answers.parse_number(result))
                    for expr, result in _CALC_RE.findall(solution)
                ),
            },
        )

    def hints(self, example: Example, response: str) -> list[str]:
        """An intermediate step of the reference solution the reply does not reproduce
        (the final step never: its result is the answer), combined with "too high/low";
        then the step alone; then the direction alone.
        """
        basic = super().hints(example, response)
        if self.extract_answer(response) is None:
            return basic
        seen = set(answers.number_tokens(response))
        steps = [
            f"One step of a correct solution is {expression} = {answers.canonical_number(value)}; "
            "compare it with your work."
            for expression, value in example.meta["steps"][:-1]
            if value is not None and value not in seen
        ]
        direction = basic[-1] if basic else ""
        return [f"{direction} {step}" for step in steps if direction] + steps + basic


def _spaced(expression: str) -> str:
    """``"16-3-4"`` → ``"16 - 3 - 4"``."""
    return _OPERATOR_RE.sub(r" \1 ", expression.strip())
