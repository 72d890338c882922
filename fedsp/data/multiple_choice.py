"""Multiple-choice tasks: ARC-Challenge and HellaSwag.

Both are scored two ways: generation (the model names an option letter, `is_correct`) and
log-likelihood of each option given a context (`choices`, as lm-evaluation-harness does).
Options are always lettered A, B, C, ... in their benchmark order, whatever the source's
own labels (22 ARC items use "1".."4" on the hub).

``prompt_style`` (``task.options.prompt_style``) chooses the wording: "fedsp" (the
default) asks for a reply ending in "Answer: <letter>"; "spear" is the SPEAR reference's
prompt (``spear_fl.data``: a generic system turn, then "Respond with ONLY the letter" above
``[QUESTION]`` / ``[CONTEXT]`` and ``[OPTIONS]`` blocks, ending in "Answer:"), for runs and
benchmarks that must pose exactly the reference's questions. Its revisions stay chat turns
(feedback, then the reference's ARC/HellaSwag revision instruction), so they still continue
from the first answer's keys and values; the reference instead re-sends the whole task
inside one rewritten prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from fedsp.data import answers, sources
from fedsp.data.base import Example, FileTask, register_task, stable_rng

__all__ = [
    "LETTERS",
    "PROMPT_STYLES",
    "ArcChallenge",
    "HellaSwag",
    "MultipleChoiceTask",
    "extract_option_letter",
    "normalize_option_text",
]

LETTERS = "ABCDE"
PROMPT_STYLES = ("fedsp", "spear")
_NOT_LETTER = "(?![A-Za-z0-9])"
_SPAN_LETTER_RE = re.compile(rf"^[\s*_\"'(\[]*([A-E]){_NOT_LETTER}")
_SPAN_NAMED_RE = re.compile(rf"\b(?:[Oo]ption|[Cc]hoice|is)\s*[(\[]?([A-E]){_NOT_LETTER}")
_SPAN_INDEX_RE = re.compile(r"^[\s*_\"'(\[]*([1-5])(?![\d.])")
_PAREN_RE = re.compile(r"\(([A-E])\)")
# "C", "C.", "(C)", "C)" alone or opening the reply; "A plant ..." is an article, not A.
_LEADING_RE = re.compile(r"^\s*\**\(?([A-E])(?:[).:]|[ \t]*(?:\n|$))")


def extract_option_letter(text: str) -> str | None:
    """The option letter a reply chooses, or None.

    Order, first tier that yields a letter wins; inside a tier the LAST occurrence wins:
      1. a declared answer: ``Answer: C``, ``Answer: (C)``, ``the answer is option C``,
         or an option number ``Answer: 3`` (→ "C");
      2. ``\\boxed{C}``;
      3. the last parenthesised letter ``(C)`` anywhere;
      4. a reply that starts with the letter (``C`` alone on its line, ``C.``, ``C)``).
    Only capitals A-E count, so the article "a" is never read as option A.
    """
    spans = answers.declared_answers(text)
    boxed = answers.last_boxed(text)
    for span in spans[::-1] + ([boxed] if boxed is not None else []):
        letter = _span_letter(span)
        if letter is not None:
            return letter
    parenthesised = _PAREN_RE.findall(text)
    if parenthesised:
        return parenthesised[-1]
    leading = _LEADING_RE.match(text)
    return leading.group(1) if leading else None


def _span_letter(span: str) -> str | None:
    for pattern in (_SPAN_LETTER_RE, _SPAN_NAMED_RE):
        match = pattern.search(span)
        if match:
            return match.group(1)
    match = _SPAN_INDEX_RE.search(span)
    return LETTERS[int(match.group(1)) - 1] if match else None


class MultipleChoiceTask(FileTask):
    """Shared prompting, extraction, scoring and hints for lettered options.

    `Example.answer` and `Example.label` are the gold letter.

    Args:
      prompt_style: "fedsp" or "spear" (the SPEAR reference's prompt; module docstring).
      source, system_prompt: see `FileTask`.
    """

    format_reminder = "End your reply with 'Answer: <letter>'."
    generic_hint = "Re-read the question and weigh every option against it."
    options_heading: ClassVar[str] = "Options"
    # The SPEAR reference's wording ("spear" prompt style): its system turn, the lines above
    # the question block and that block's heading, and its revision instruction.
    spear_system = "You are a helpful assistant."
    spear_header: ClassVar[str] = (
        "Answer the multiple-choice question by choosing the best option.\n"
        "Respond with ONLY the letter ({letters})."
    )
    spear_block: ClassVar[str] = "QUESTION"
    spear_reminder = 'Answer with a single letter choice like "A", "B", "C", or "D".'

    def __init__(
        self, *, prompt_style: str = "fedsp", source: str = "auto", system_prompt: bool = True
    ):
        super().__init__(source=source, system_prompt=system_prompt)
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {prompt_style!r}")
        self.prompt_style = prompt_style
        if prompt_style == "spear":
            self.format_reminder = self.spear_reminder

    @property
    def instruction(self) -> str:
        return self.spear_system if self.prompt_style == "spear" else super().instruction

    def prompt(self, example: Example) -> str:
        options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(example.choices))
        if self.prompt_style == "spear":
            *rest, last = list(LETTERS[: len(example.choices)])
            named = ", ".join(rest) + ("," if len(rest) > 1 else "") + f" or {last}"
            header = self.spear_header.format(letters=named)
            return (
                f"{header}\n\n[{self.spear_block}]\n{example.question}\n\n"
                f"[OPTIONS]\n{options}\n\nAnswer:"
            )
        return f"{example.question}\n\n{self.options_heading}:\n{options}"

    def extract_answer(self, text: str) -> str | None:
        """`extract_option_letter`: declared > boxed > last "(X)" > leading letter."""
        return extract_option_letter(text)

    def predict(self, text: str, example: Example) -> str | None:
        """The chosen letter if it names an option of ``example``; otherwise the one option
        whose text the last declared answer (else the whole reply) quotes, if exactly one.
        """
        letter = self.extract_answer(text)
        if letter is not None:
            return letter if LETTERS.index(letter) < len(example.choices) else None
        spans = answers.declared_answers(text)
        region = normalize_option_text(spans[-1] if spans else text)
        options = [normalize_option_text(option) for option in example.choices]
        quoted = [
            i
            for i, option in enumerate(options)
            if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", region)
        ]
        return LETTERS[quoted[0]] if len(quoted) == 1 else None

    def is_correct(self, text: str, example: Example) -> bool:
        """The predicted option (letter, option number or quoted option text) is the gold."""
        return self.predict(text, example) == example.answer

    def hints(self, example: Example, response: str) -> list[str]:
        """Rule out one more wrong option (never the gold, never the reply's own choice).

        Only when at least two candidates then remain besides the reply's own (wrong)
        choice, so elimination alone never pins down the gold (3-option items get the
        generic hint). Which option is ruled out is a stable hash of (uid, response).
        """
        predicted = self.predict(response, example)
        if predicted is None:
            return [f"I could not tell which option you chose. {self.format_reminder}"]
        gold, chosen = LETTERS.index(example.answer), LETTERS.index(predicted)
        if gold == chosen or len(example.choices) < 4:
            return []
        others = [i for i in range(len(example.choices)) if i not in (gold, chosen)]
        order = stable_rng(example.uid, response).permutation(len(others))
        ruled_out = [others[k] for k in order]
        return [
            f'Option ({LETTERS[i]}), "{example.choices[i]}", is not the answer either.'
            for i in ruled_out
        ]

    def _example(
        self, uid: str, question: str, options: list[str], gold: int, meta: dict[str, Any]
    ) -> Example:
        if not 2 <= len(options) <= len(LETTERS) or not 0 <= gold < len(options):
            raise ValueError(
                f"{self.name} item {uid}: needs 2-{len(LETTERS)} options and a gold index among "
                f"them, got {len(options)} options and gold {gold}"
            )
        letter = LETTERS[gold]
        return Example(
            uid=uid,
            question=question,
            answer=letter,
            choices=tuple(options),
            label=letter,
            gold_response=f"The answer is ({letter}) {options[gold]}\nAnswer: {letter}",
            meta=meta,
        )


@register_task("arc_challenge")
class ArcChallenge(MultipleChoiceTask):
    """ARC-Challenge science questions (Clark et al. 2018, arXiv 1803.05457).

    Local: ``<data_dir>/arc_challenge/ARC-Challenge-Test.jsonl`` (test split only; HF
    ``allenai/ai2_arc`` schema). Hub: ``allenai/ai2_arc``, config ``ARC-Challenge``,
    splits train / validation / test. Label: the gold letter.
    """

    splits = ("train", "validation", "test")
    files: ClassVar[Mapping[str, str]] = {"test": "arc_challenge/ARC-Challenge-Test.jsonl"}
    hub_name = "allenai/ai2_arc (config ARC-Challenge)"
    description = "Answer the science question by choosing the correct option."

    def _hub_records(self, split: str) -> list[dict[str, Any]]:
        return sources.hub_dataset("allenai/ai2_arc", "ARC-Challenge", split)

    def _to_example(self, record: Mapping[str, Any], split: str, index: int) -> Example:
        labels = [str(label) for label in record["choices"]["label"]]
        key = str(record["answerKey"])
        if key not in labels:
            raise ValueError(
                f"arc_challenge item {record['id']}: answerKey {key!r} not among labels {labels}"
            )
        return self._example(
            record["id"],
            record["question"],
            list(record["choices"]["text"]),
            labels.index(key),
            {"source_labels": tuple(labels)},
        )

    def choices(self, example: Example) -> tuple[str, list[str], int]:
        """``("Question: q\\nAnswer:", [" option", ...], gold)`` as in lm-evaluation-harness."""
        return (
            f"Question: {example.question}\nAnswer:",
            [f" {c}" for c in example.choices],
            LETTERS.index(example.answer),
        )


@register_task("hellaswag")
class HellaSwag(MultipleChoiceTask):
    """HellaSwag sentence completion (Zellers et al. 2019, arXiv 1905.07830).

    Local: ``<data_dir>/hellaswag/hellaswag_val.jsonl`` (``idx``, ``activity_label``,
    ``ctx``, ``label``, ``endings``; text preprocessed as lm-evaluation-harness does).
    Hub: ``Rowan/hellaswag`` (train / validation; its test split has no labels), given the
    same preprocessing. The question is ``"<activity_label>: <ctx>"``; label: the gold
    letter (``meta["activity_label"]`` is the alternative partition key).
    """

    splits = ("train", "validation")
    files: ClassVar[Mapping[str, str]] = {"validation": "hellaswag/hellaswag_val.jsonl"}
    hub_name = "Rowan/hellaswag"
    description = "Choose the ending that best completes the text."
    options_heading = "Endings"
    spear_header = (
        "Choose the best continuation of the context. Respond with ONLY the letter ({letters})."
    )
    spear_block = "CONTEXT"

    def _hub_records(self, split: str) -> list[dict[str, Any]]:
        return [
            {
                "idx": r["ind"],
                "activity_label": _preprocess(r["activity_label"]),
                "ctx": _preprocess(r["ctx"]),
                "label": int(r["label"]),
                "endings": [_preprocess(e) for e in r["endings"]],
            }
            for r in sources.hub_dataset("Rowan/hellaswag", None, split)
        ]

    def _to_example(self, record: Mapping[str, Any], split: str, index: int) -> Example:
        question = f"{record['activity_label']}: {record['ctx']}"
        return self._example(
            f"hellaswag/{split}/{record['idx']}",
            question,
            list(record["endings"]),
            int(record["label"]),
            {"activity_label": record["activity_label"]},
        )

    def choices(self, example: Example) -> tuple[str, list[str], int]:
        """``("<activity>: <ctx>", [" ending", ...], gold)`` as in lm-evaluation-harness."""
        return example.question, [f" {e}" for e in example.choices], LETTERS.index(example.answer)


def _preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup (drop ``[header]``-style tags), stripped."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ").strip()


def normalize_option_text(text: str) -> str:
    """Lower case, single spaces, no surrounding full stop: for matching option texts."""
    return " ".join(text.lower().split()).strip(" .")
