"""StrategyQA yes/no questions needing implicit multi-step reasoning (Geva et al. 2021,
arXiv 2101.02235), with the train / dev split of Segal et al.

Local: ``<data_dir>/strategyqa/{train,dev}.json`` (JSON arrays of ``qid``, ``question``,
``answer`` bool, ``facts``, ``decomposition``, ...). Online: the same two files from
github.com/eladsegal/strategyqa (the commit in SOURCE.txt) through `datasets`' download
manager; the hub datasets hold other splits of the same questions.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from fedsp.data import answers, sources
from fedsp.data.base import Example, FileTask, register_task, stable_rng

__all__ = ["BOOLEAN_WORDS", "StrategyQA", "extract_yes_no"]

BOOLEAN_WORDS = ("yes", "no", "true", "false")
_BOOLEAN_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_LEADING_RE = re.compile(r"^[\s*_\"'(]*(yes|no|true|false)\b", re.IGNORECASE)
_COMMIT = "1ba1e97452e189569357876f2854b01357ffbe37"
_URL = f"https://raw.githubusercontent.com/eladsegal/strategyqa/{_COMMIT}/data/strategyqa/{{split}}.json"


def extract_yes_no(text: str) -> str | None:
    """The verdict of a reply, "yes" or "no" (true/false count as yes/no), or None.

    Order, first tier that yields a verdict wins; inside a tier the LAST occurrence wins:
      1. the first yes/no/true/false word of a declared answer (``Answer: No, because``);
      2. the same inside ``\\boxed{}``;
      3. a reply that starts with one (``Yes. Apples ...``).
    Free-text mentions elsewhere never count: "there is no evidence" is not a verdict.
    """
    boxed = answers.last_boxed(text)
    for span in answers.declared_answers(text)[::-1] + ([boxed] if boxed is not None else []):
        match = _LEADING_RE.match(span) or _BOOLEAN_RE.search(span)
        if match:
            return _yes_no(match.group(1))
    match = _LEADING_RE.match(text)
    return _yes_no(match.group(1)) if match else None


def _yes_no(word: str) -> str:
    return "yes" if word.lower() in ("yes", "true") else "no"


@register_task("strategyqa")
class StrategyQA(FileTask):
    """StrategyQA: the answer is "yes" or "no"; label: the gold answer.

    ``gold_response`` is the supporting facts followed by the verdict; ``meta`` keeps
    ``facts``, ``decomposition``, ``term`` and ``description``.
    """

    splits = ("train", "dev")
    files: ClassVar[Mapping[str, str]] = {
        "train": "strategyqa/train.json",
        "dev": "strategyqa/dev.json",
    }
    hub_name = f"github.com/eladsegal/strategyqa@{_COMMIT[:8]} (via datasets.DownloadManager)"
    description = "Answer the yes/no question. Think it through briefly first."
    format_reminder = "End your reply with 'Answer: yes' or 'Answer: no'."
    generic_hint = "Think about which facts the question depends on, then reason again."

    def _read_local(self, path: pathlib.Path) -> list[dict[str, Any]]:
        return sources.read_json(path)

    def _hub_records(self, split: str) -> list[dict[str, Any]]:
        return sources.read_json(sources.hub_file(_URL.format(split=split)))

    def _to_example(self, record: Mapping[str, Any], split: str, index: int) -> Example:
        gold = "yes" if record["answer"] else "no"
        facts = tuple(f.strip() for f in record.get("facts", ()))
        return Example(
            uid=record["qid"],
            question=record["question"],
            answer=gold,
            label=gold,
            gold_response=" ".join(f if f.endswith((".", "!", "?")) else f"{f}." for f in facts)
            + f"\nAnswer: {gold}",
            meta={
                "facts": facts,
                "decomposition": tuple(record.get("decomposition", ())),
                "term": record.get("term", ""),
                "description": record.get("description", ""),
            },
        )

    def extract_answer(self, text: str) -> str | None:
        """`extract_yes_no`: declared > boxed > leading word."""
        return extract_yes_no(text)

    def is_correct(self, text: str, example: Example) -> bool:
        """The reply's verdict equals the gold "yes"/"no"."""
        return self.extract_answer(text) == example.answer

    def hints(self, example: Example, response: str) -> list[str]:
        """A supporting fact from the benchmark, skipping every fact that contains a
        literal yes/no/true/false (stable hash order over the rest).

        Facts support the reasoning but are not the verdict; the generic hint covers
        items whose facts all contain such a word.
        """
        if self.extract_answer(response) is None:
            return [
                "I could not find your final verdict. End your reply with 'Answer:' followed by "
                "your one-word verdict."
            ]
        usable = [f for f in example.meta["facts"] if not _BOOLEAN_RE.search(f)]
        order = stable_rng(example.uid, response).permutation(len(usable))
        return [f"A fact that helps: {usable[k]}" for k in order]
