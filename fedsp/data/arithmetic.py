"""Synthetic arithmetic, generated in code: the default task (no files needed).

Problems are ``a <op> b`` with a configurable number of digits per operand and operation,
and a configurable operation mix. The label is the operation, so Dirichlet partitions over
labels give clients different operation mixes (non-IID).

Defaults fit SmolLM2-135M-Instruct: greedy, it solves some of the problems of each
operation and misses most, so there are successes to learn from and headroom (its
measured rates are in BENCHMARKS.md, "Task headroom").
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Mapping, Sequence

import numpy as np

from fedsp.data.base import Example, Task, register_task
from fedsp.data.numeric import NumericAnswers

__all__ = ["OPERATIONS", "Arithmetic"]

# name -> (symbol shown to the model, function)
OPERATIONS = {"add": ("+", operator.add), "sub": ("-", operator.sub), "mul": ("*", operator.mul)}
_DEFAULT_DIGITS = {"add": (2, 2), "sub": (2, 2), "mul": (2, 1)}


@register_task("arithmetic")
class Arithmetic(NumericAnswers, Task):
    """``a + b``, ``a - b``, ``a * b`` with configurable digits and operation mix.

    Problems are drawn uniformly (with replacement) from the split's share of the problem
    space. A stable hash of ``(op, a, b)`` assigns every problem to train or test, so the
    two splits are disjoint for every seed: test problems are never trained on.

    Args:
      operations: operation names, a subset of ``("add", "sub", "mul")``.
      digits: per operation, digits of (a, b) as a pair or one int for both; missing
        operations use the defaults add (2, 2), sub (2, 2), mul (2, 1).
      mix: per operation, relative frequency (need not sum to 1); default uniform.
      num_train: train examples generated when `load` gets no ``limit``.
      num_test: test examples generated when `load` gets no ``limit``.
      test_fraction: share of the problem space reserved for the test split.
      allow_negative: if False, subtraction puts the larger operand first.
      system_prompt: see `Task`.
    """

    splits = ("train", "test")
    description = "Solve the arithmetic problem."
    generic_hint = "Redo the calculation carefully, digit by digit."

    def __init__(
        self,
        *,
        operations: Sequence[str] = ("add", "sub", "mul"),
        digits: Mapping[str, int | Sequence[int]] | None = None,
        mix: Mapping[str, float] | None = None,
        num_train: int = 2000,
        num_test: int = 300,
        test_fraction: float = 0.2,
        allow_negative: bool = False,
        system_prompt: bool = True,
    ):
        super().__init__(system_prompt=system_prompt)
        operations = tuple(operations)
        if (
            not operations
            or len(set(operations)) != len(operations)
            or not set(operations) <= set(OPERATIONS)
        ):
            raise ValueError(
                f"operations must be distinct names from {tuple(OPERATIONS)}, got {operations!r}"
            )
        self.operations = operations
        digits = dict(digits or {})
        if not set(digits) <= set(operations):
            raise ValueError(
                f"digits has operations {sorted(set(digits) - set(operations))} that are not in "
                f"operations={operations}"
            )
        self.digits = {
            op: _digit_pair(op, digits.get(op, _DEFAULT_DIGITS[op])) for op in operations
        }
        mix = dict(mix) if mix is not None else dict.fromkeys(operations, 1.0)
        if (
            set(mix) != set(operations)
            or any(not np.isfinite(w) or w < 0 for w in mix.values())
            or sum(mix.values()) <= 0
        ):
            raise ValueError(
                f"mix must give a non-negative weight to each of {operations} (not all zero), "
                f"got {mix!r}"
            )
        total = float(sum(mix.values()))
        self.mix = {op: float(mix[op]) / total for op in operations}
        for field, value in (("num_train", num_train), ("num_test", num_test)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        self.num_examples = {"train": num_train, "test": num_test}
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.test_fraction = float(test_fraction)
        self.allow_negative = bool(allow_negative)
        if (
            not allow_negative
            and "sub" in operations
            and self.digits["sub"][0] < self.digits["sub"][1]
        ):
            raise ValueError(
                f"digits['sub']={self.digits['sub']} puts fewer digits first; with "
                f"allow_negative=False the first operand must have at least as many"
            )

    def load(self, split, data_dir=None, limit=None, seed=0):
        """Generates ``limit`` (default ``num_train``/``num_test``) examples from ``seed``.

        ``data_dir`` is ignored: nothing is read from disk. The ``(split, seed)`` pair
        fixes the result; the operation counts follow ``mix`` exactly (largest
        remainder), and the examples come shuffled.

        Raises:
          ValueError: unknown ``split`` or ``limit`` < 1.
        """
        del data_dir
        self._check_load_args(split, limit)
        count = self.num_examples[split] if limit is None else int(limit)
        rng = np.random.default_rng([seed, self.splits.index(split)])
        quotas = _largest_remainder([self.mix[op] for op in self.operations], count)
        problems = []
        for op, quota in zip(self.operations, quotas, strict=True):
            problems += self._draw(op, quota, split, rng)
        return [
            self._example(*problems[j], uid=f"arithmetic/{split}/{seed}/{i}")
            for i, j in enumerate(rng.permutation(len(problems)))
        ]

    def _draw(
        self, op: str, count: int, split: str, rng: np.random.Generator
    ) -> list[tuple[str, int, int]]:
        """``count`` problems ``(op, a, b)`` of ``split``'s share, by rejection sampling."""
        (da, db), want_test = self.digits[op], split == "test"
        share = self.test_fraction if want_test else 1.0 - self.test_fraction
        drawn: list[tuple[str, int, int]] = []
        for _ in range(100):
            batch = int(1.5 * (count - len(drawn)) / share) + 16
            a = rng.integers(10 ** (da - 1), 10**da, size=batch).tolist()
            b = rng.integers(10 ** (db - 1), 10**db, size=batch).tolist()
            for x, y in zip(a, b, strict=True):
                if op == "sub" and not self.allow_negative and x < y:
                    x, y = y, x
                if len(drawn) < count and self._in_test(op, x, y) == want_test:
                    drawn.append((op, x, y))
            if len(drawn) == count:
                return drawn
        raise ValueError(
            f"the {split} share of {op} problems with digits {self.digits[op]} looks empty; "
            f"use more digits or another test_fraction (now {self.test_fraction})"
        )

    def _in_test(self, op: str, a: int, b: int) -> bool:
        digest = hashlib.blake2b(f"{op}:{a}:{b}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") < self.test_fraction * 2**64

    def _example(self, op: str, a: int, b: int, *, uid: str) -> Example:
        symbol, fn = OPERATIONS[op]
        result = fn(a, b)
        return Example(
            uid=uid,
            question=f"What is {a} {symbol} {b}?",
            answer=str(result),
            label=op,
            gold_response=f"{a} {symbol} {b} = {result}\nAnswer: {result}",
            meta={"a": a, "b": b, "op": op},
        )


def _digit_pair(op: str, spec: int | Sequence[int]) -> tuple[int, int]:
    pair = (spec, spec) if isinstance(spec, int) else tuple(spec)
    if len(pair) != 2 or not all(isinstance(d, int) and 1 <= d <= 9 for d in pair):
        raise ValueError(f"digits[{op!r}] must be an int or a pair of ints in 1..9, got {spec!r}")
    return pair


def _largest_remainder(weights: list[float], total: int) -> list[int]:
    """Integer quotas proportional to ``weights`` that sum to ``total``."""
    exact = np.asarray(weights) * total
    quotas = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quotas), kind="stable")[: total - quotas.sum()]:
        quotas[i] += 1
    return quotas.tolist()
