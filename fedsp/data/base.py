"""`Example`, the `Task` interface, and the task registry.

A task turns benchmark records into `Example` objects and knows, for its kind of answer,
how to prompt a chat model, how to read the model's final answer, how to judge it, and
which hints it may give (`fedsp.data.feedback` filters them so none reveals the gold).

Tasks are stateless apart from their options, so one instance can serve every client.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedsp.data import sources

__all__ = [
    "Example",
    "FileTask",
    "Message",
    "Task",
    "get_task",
    "parse_split",
    "register_task",
    "stable_rng",
    "subset",
    "task_names",
]

Message = dict[str, str]
_TaskT = TypeVar("_TaskT", bound=type["Task"])
_REGISTRY: dict[str, type[Task]] = {}


@dataclasses.dataclass(frozen=True)
class Example:
    """One benchmark item.

    Attributes:
      uid: unique id within its task and split (the benchmark's id where it has one).
      question: the problem text shown to the model (without answer options).
      answer: the canonical gold answer: a number without formatting ("1000"), an option
        letter ("C"), "yes"/"no", or a MATH LaTeX answer.
      choices: option texts for multiple choice, in letter order A, B, ...; else empty.
      label: a grouping key for non-IID partitions (operation, subject, gold option, ...).
      gold_response: a full worked reply ending in the task's answer format, for SFT /
        SPIN / TPAW; None where the benchmark has none.
      meta: further benchmark fields (read-only by convention; excluded from hashing).
    """

    uid: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    label: str = ""
    gold_response: str | None = None
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)


class Task(abc.ABC):
    """A benchmark: loading, prompting, answer extraction, correctness and hints.

    Subclasses set `splits`, `description`, `format_reminder` and `generic_hint` and
    implement `load`, `extract_answer` and `is_correct`; `register_task` sets `name`.

    Args:
      system_prompt: put the instruction in a system message (True) or at the top of the
        first user message (False, for chat templates without a system role).
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    """What to do, e.g. "Solve the math word problem step by step."."""
    format_reminder: str
    """How to state the final answer, e.g. "End your reply with 'Answer: <number>'."; a
    class default an instance may replace (a task option's wording)."""
    generic_hint: ClassVar[str]
    """The hint given when no specific hint is safe; must never depend on the gold."""

    def __init__(self, *, system_prompt: bool = True):
        self.system_prompt = bool(system_prompt)

    @property
    def instruction(self) -> str:
        """The task instruction: what to do and how to state the final answer."""
        return f"{self.description} {self.format_reminder}"

    @abc.abstractmethod
    def load(
        self,
        split: str,
        data_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        seed: int = 0,
    ) -> list[Example]:
        """Examples of one split.

        Args:
          split: one of `splits`; file-backed tasks also take a slice of one in the
            Hugging Face ``datasets`` syntax, ``"test[:75%]"`` or ``"train[100:200]"``
            (see `parse_split`).
          data_dir: benchmark folder; defaults to ``$FEDSP_DATA_DIR`` (see
            `fedsp.data.sources`). Generated tasks ignore it.
          limit: file-backed tasks keep a random subset of this many examples (drawn
            with ``seed``, kept in file order; a limit above the split size keeps all);
            generated tasks generate this many. None: all / the task's default count.
          seed: the subset seed; generated tasks generate from it.

        Raises:
          ValueError: unknown ``split``, ``limit`` < 1, or an empty split.
          DataNotFoundError: the split is neither on disk nor obtainable from the hub.
        """

    def prompt(self, example: Example) -> str:
        """The user-turn text for ``example`` (multiple-choice tasks add the options)."""
        return example.question

    def messages(
        self,
        example: Example,
        *,
        feedback: str | Sequence[str] | None = None,
        previous: str | Sequence[str] | None = None,
    ) -> list[Message]:
        """Chat messages for the tokenizer's chat template.

        ``[system: instruction, user: question]``, then for each earlier attempt
        ``[assistant: attempt, user: feedback + "Please try again." + format reminder]``.

        Args:
          example: the item.
          feedback: the feedback on each earlier attempt (a string for one attempt);
            None gives a bare retry request.
          previous: the earlier attempts, oldest first (a string for one attempt).

        Raises:
          ValueError: ``feedback`` without ``previous``, or their lengths differ.
        """
        attempts = _as_tuple(previous)
        notes = _as_tuple(feedback)
        if notes and len(notes) != len(attempts):
            raise ValueError(
                f"feedback needs one entry per previous attempt: got {len(notes)} "
                f"feedback and {len(attempts)} previous"
            )
        if self.system_prompt:
            msgs = [
                {"role": "system", "content": self.instruction},
                {"role": "user", "content": self.prompt(example)},
            ]
        else:
            msgs = [{"role": "user", "content": f"{self.instruction}\n\n{self.prompt(example)}"}]
        for i, attempt in enumerate(attempts):
            retry = f"Please try again. {self.format_reminder}"
            msgs.append({"role": "assistant", "content": attempt})
            msgs.append({"role": "user", "content": f"{notes[i]}\n{retry}" if notes else retry})
        return msgs

    @abc.abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """The final answer declared in a model reply, canonicalised; None if absent."""

    def predict(self, text: str, example: Example) -> str | None:
        """The reply's answer for this example (may use the example, e.g. option texts)."""
        del example
        return self.extract_answer(text)

    @abc.abstractmethod
    def is_correct(self, text: str, example: Example) -> bool:
        """Whether the reply's final answer matches the gold answer."""

    def choices(self, example: Example) -> tuple[str, list[str], int]:
        """``(context, continuations, gold_index)`` for log-likelihood scoring.

        Only multiple-choice tasks support it.
        """
        raise NotImplementedError(
            f"task {self.name!r} is not multiple choice; log-likelihood "
            f"scoring needs arc_challenge or hellaswag"
        )

    def hints(self, example: Example, response: str) -> list[str]:
        """Candidate hints for a wrong ``response``, most specific first.

        Candidates may leak the gold: use `fedsp.data.feedback.Hint`, which drops every
        candidate that `leaks` and falls back to `generic_hint`.
        """
        del example, response
        return []

    supports_slices: ClassVar[bool] = False
    """Whether `load` takes ``"name[start:stop]"`` slices of a split (file-backed tasks)."""

    def has_split(self, split: str) -> bool:
        """Whether `load` accepts ``split``: a name in `splits`, or a slice of one."""
        if split in self.splits:
            return True
        parsed = parse_split(split) if self.supports_slices else None
        return parsed is not None and parsed[0] in self.splits

    def splits_help(self) -> str:
        """The accepted split names, for error messages."""
        tail = f" or a slice such as '{self.splits[-1]}[:75%]'" if self.supports_slices else ""
        return f"{self.splits}{tail}"

    def _check_load_args(self, split: str, limit: int | None) -> None:
        if not isinstance(split, str) or not self.has_split(split):
            raise ValueError(
                f"split must be one of {self.splits_help()} for task {self.name!r}, got {split!r}"
            )
        _check_limit(limit)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class FileTask(Task):
    """A task read from benchmark files (local data directory, else the hub).

    Subclasses set `files` (split → path relative to the data directory; a split may have
    no local file) and `hub_name`, and implement `_hub_records` (every split must be
    readable from the hub) and `_to_example` (and `_read_local` when the local file is not
    JSONL).

    Args:
      source: "auto" (local file if present, else the Hugging Face hub), "local" or "hub".
      system_prompt: see `Task`.
    """

    files: ClassVar[Mapping[str, str]]
    hub_name: ClassVar[str]
    """The hub dataset named in messages, e.g. "openai/gsm8k (main)"."""

    def __init__(self, *, source: str = "auto", system_prompt: bool = True):
        super().__init__(system_prompt=system_prompt)
        if source not in sources.SOURCES:
            raise ValueError(f"source must be one of {sources.SOURCES}, got {source!r}")
        self.source = source

    supports_slices = True

    def load(self, split, data_dir=None, limit=None, seed=0):
        self._check_load_args(split, limit)
        name, start, stop = parse_split(split) or (split, None, None)
        records, origin = sources.load_records(
            dataset=self.name,
            split=name,
            relpath=self.files.get(name),
            read_local=self._read_local,
            hub=lambda: self._hub_records(name),
            hub_name=self.hub_name,
            data_dir=data_dir,
            source=self.source,
        )
        # Examples are built from the whole split first, so a slice's uids are the whole
        # split's: "test[:75%]" and "test[75%:]" never share one.
        examples = [self._to_example(r, name, i) for i, r in enumerate(records)]
        examples = examples[slice_bounds(start, stop, len(examples))]
        if not examples:
            raise ValueError(f"split {split!r} of task {self.name!r} is empty (read from {origin})")
        return subset(examples, limit, seed)

    def _read_local(self, path: pathlib.Path) -> list[dict[str, Any]]:
        """Records of a local file, in the benchmark's local schema (JSONL by default)."""
        return sources.read_jsonl(path)

    @abc.abstractmethod
    def _hub_records(self, split: str) -> list[dict[str, Any]]:
        """Records of a hub split, converted to the local schema."""

    @abc.abstractmethod
    def _to_example(self, record: Mapping[str, Any], split: str, index: int) -> Example:
        """One record (local schema) as an `Example`."""


def register_task(name: str) -> Callable[[_TaskT], _TaskT]:
    """Class decorator: makes a `Task` subclass available as ``get_task(name)``."""

    def wrap(cls: _TaskT) -> _TaskT:
        if name in _REGISTRY:
            raise ValueError(f"task {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def task_names() -> tuple[str, ...]:
    """Names accepted by `get_task`, sorted."""
    return tuple(sorted(_REGISTRY))


def get_task(name: str, **options: Any) -> Task:
    """The task registered as ``name``, constructed with ``options``.

    Raises:
      ValueError: unknown ``name`` (the message lists the names) or an option the task
        does not take (the message lists its options).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of: {', '.join(task_names())}")
    cls = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {accepted}")
    return cls(**options)


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


_SLICE_RE = re.compile(r"(?P<name>\w+)\[(?P<start>[+-]?\d+%?)?:(?P<stop>[+-]?\d+%?)?\]")


def parse_split(split: str) -> tuple[str, str | None, str | None] | None:
    """``"test[:75%]"`` → ``("test", None, "75%")``; None when ``split`` is not a slice.

    The syntax is the Hugging Face ``datasets`` one, so a slice read from local files and
    ``datasets.load_dataset(..., split="test[:75%]")`` hold the same records: bounds are
    example counts or percentages, negative ones count from the end, and either may be
    left out. A file that holds only one split (the offline ARC-Challenge test set) can
    so be cut into disjoint train and evaluation parts.
    """
    match = _SLICE_RE.fullmatch(split) if isinstance(split, str) else None
    if match is None:
        return None
    return match["name"], match["start"], match["stop"]


def slice_bounds(start: str | None, stop: str | None, size: int) -> slice:
    """The Python slice of a split of ``size`` examples for `parse_split`'s bounds.

    A percentage ``p%`` is the index ``round(p * size / 100)`` (``datasets``' default
    "closest" rounding), so ``[:p%]`` and ``[p%:]`` are complementary.
    """

    def index(bound: str | None) -> int | None:
        if bound is None:
            return None
        if bound.endswith("%"):
            pct = int(bound[:-1])
            if not -100 <= pct <= 100:
                raise ValueError(f"split slice bound {bound!r} is outside -100%..100%")
            return round(pct * size / 100)
        return int(bound)

    return slice(index(start), index(stop))


def subset(examples: Sequence[Example], limit: int | None, seed: int) -> list[Example]:
    """A random subset of ``limit`` examples drawn with ``seed``, kept in input order.

    ``limit=None`` or ``limit >= len(examples)`` keeps all.

    Raises:
      ValueError: ``limit`` is not None or a positive integer.
    """
    _check_limit(limit)
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:limit])
    return [examples[i] for i in keep]


def stable_rng(*parts: object) -> np.random.Generator:
    """A generator seeded by a hash of ``parts``: the same inputs give the same draws in
    every process and run (unlike Python's salted `hash`), independent of call order.
    """
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def _check_limit(limit: int | None) -> None:
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1
    ):
        raise ValueError(f"limit must be None or a positive integer, got {limit!r}")
