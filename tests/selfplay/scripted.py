"""A scripted stand-in for the rollout sampler: replies chosen by question and attempt."""

from __future__ import annotations

import numpy as np

from fedsp.data.base import Example
from fedsp.selfplay.packing import end_of_turn_id
from fedsp.selfplay.rollout import Completion


class Scripted:
    """``generate_fn`` returning ``script[question][attempt]`` for each prompt.

    The attempt is the number of earlier calls for the same question (0 for a first
    answer); a revision prompt must also ask for a retry.
    ``calls`` records (question, attempt, prompt text) per generated row, ``options``
    the cache keywords of every call (its replies carry no keys/values to reuse).
    """

    def __init__(self, tokenizer, script: dict[str, list[str]], revisions: bool = True):
        self.tokenizer, self.script, self.calls, self.options = tokenizer, script, [], []
        self.revisions = revisions  # False: repeated calls are group samples (GRPO)
        self.end = end_of_turn_id(tokenizer)

    def __call__(
        self, policy, lora_state, prompts, keys, params, *, keep_cache=False, continue_from=None
    ):
        assert keys.shape == (len(prompts),)
        self.options.append({"keep_cache": keep_cache, "continue_from": continue_from})
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            (question,) = [q for q in self.script if q in text]
            attempt = sum(q == question for q, *_ in self.calls)
            assert ("Please try again" in text) == (self.revisions and attempt > 0)
            reply = self.script[question][attempt]
            tokens = np.asarray([*self.tokenizer.encode(reply), self.end], np.int32)
            self.calls.append((question, attempt, text))
            out.append(Completion(tokens, np.zeros(len(tokens), np.float32), reply))
        return out


def example(question: str, answer: str) -> Example:
    return Example(uid=question, question=question, answer=answer, label="add")
