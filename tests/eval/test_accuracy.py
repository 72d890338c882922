"""Evaluation on a tiny random model with the real SmolLM2 tokenizer, against
independent numpy / per-example computations."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from fedsp.data import Example, get_task
from fedsp.eval import evaluate, generation_accuracy, loglik_accuracy
from fedsp.model.lora import LoRAConfig, apply_lora, split_lora
from fedsp.model.sampling import generate
from tests.federated import fixtures
from tests.model import tiny


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from fedsp.model import from_pretrained

    model, tokenizer = from_pretrained(fixtures.save_tiny_model(tmp_path_factory.mktemp("m")))
    apply_lora(model, LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    graphdef, lora_state, base_state = split_lora(model)
    return model, graphdef, (lora_state, base_state), tokenizer


def _log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_loglik_accuracy_matches_numpy_scoring(policy):
    model, graphdef, states, tokenizer = policy
    task = get_task("arc_challenge")
    items = [
        Example(uid=str(i), question=q, answer="A", choices=c)
        for i, (q, c) in enumerate(
            [
                ("Which is a metal?", ("iron", "wood", "glass")),
                ("What do plants need?", ("sunlight and water", "sand", "plastic bags", "noise")),
                ("Which planet is red?", ("Mars", "Venus")),
                ("What melts ice?", ("heat", "cold air", "darkness")),
            ]
        )
    ]
    best = []
    for ex in items:
        context, continuations, _ = task.choices(ex)
        ctx = tokenizer.encode(context)
        scores = []
        for cont in continuations:
            ids = np.asarray([ctx + tokenizer.encode(cont)])
            logp = _log_softmax(tiny.logits(model, ids)[0])
            scores.append(sum(logp[t - 1, ids[0, t]] for t in range(len(ctx), ids.shape[1])))
        best.append(int(np.argmax(scores)))
    # Gold = numpy's choice for items 0 and 2, a different option for 1 and 3: acc = 1/2.
    letters = "ABCD"
    golds = [best[0], (best[1] + 1) % 4, best[2], (best[3] + 1) % 3]
    items = [
        Example(uid=ex.uid, question=ex.question, answer=letters[g], choices=ex.choices)
        for ex, g in zip(items, golds)
    ]
    result = loglik_accuracy(graphdef, states, tokenizer, task, items, batch_size=3)
    assert result["accuracy"] == 0.5 and result["total"] == 4.0
    assert evaluate(graphdef, states, tokenizer, task, items, batch_size=5)["accuracy"] == 0.5


def test_generation_accuracy_matches_one_by_one_greedy_decoding(policy):
    _, graphdef, states, tokenizer = policy
    task = get_task("arithmetic")
    items = task.load("test", limit=5, seed=0)
    replies = []
    for ex in items:
        ids, mask = tokenizer.encode_batch(tokenizer.apply_chat_template([task.messages(ex)]))
        out = generate(
            graphdef,
            states,
            ids,
            mask,
            max_new_tokens=6,
            temperature=0.0,
            eos_ids=tokenizer.eos_token_ids,
            pad_id=tokenizer.pad_token_id,
        )
        replies.append(tokenizer.batch_decode(np.asarray(out.tokens))[0])

    # Make the numbers checkable: gold = what the model says for items 1 and 3 is
    # impossible to arrange, so judge with a task whose correctness is the reply itself.
    class EchoTask(type(task)):
        def is_correct(self, text, example):
            return text == example.meta["reply"]

    echo = EchoTask()
    judged = [
        Example(
            uid=ex.uid,
            question=ex.question,
            answer=ex.answer,
            meta={"reply": replies[i] if i in (1, 3) else "never"},
        )
        for i, ex in enumerate(items)
    ]
    result = generation_accuracy(
        graphdef, states, tokenizer, echo, judged, max_new_tokens=6, batch_size=4
    )
    assert result["accuracy"] == pytest.approx(2 / 5) and result["total"] == 5.0
    assert 1.0 <= result["mean_reply_tokens"] <= 6.0


def test_evaluate_rejects_unknown_mode_and_empty_set(policy):
    _, graphdef, states, tokenizer = policy
    task = get_task("arithmetic")
    with pytest.raises(ValueError, match="multiple_choice must be one of"):
        evaluate(graphdef, states, tokenizer, task, task.load("test", limit=1), multiple_choice="x")
    with pytest.raises(ValueError, match="examples is empty"):
        generation_accuracy(graphdef, states, tokenizer, task, [], max_new_tokens=2, batch_size=1)
