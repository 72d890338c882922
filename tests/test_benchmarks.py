"""The client-update benchmark's bookkeeping: its FLOP count against XLA's, and the
reference figures it reads from refbench's output."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from benchmarks import client_update
from benchmarks.common import LORA_TARGETS
from fedsp.model import Transformer
from fedsp.model.config import ModelConfig
from fedsp.model.lora import LoRAConfig, apply_lora


def test_forward_flops_matches_xla_cost_analysis():
    # One layer: XLA's cost analysis counts a loop body once, whatever the trip count.
    # XLA also computes the masked half of the causal scores and the elementwise ops,
    # which the useful count leaves out: a few percent at this size.
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=16, alpha=32.0, targets=LORA_TARGETS), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    ids = jnp.zeros((1, 128), jnp.int32)
    forward = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))
    cost = forward.lower(state, ids, jnp.ones_like(ids)).compile().cost_analysis()
    ours = client_update.forward_flops(cfg, 128)
    assert ours == pytest.approx(cost["flops"], rel=0.1)
    # Decoding after a context attends to it; the LM head on one position only.
    step = client_update.forward_flops(cfg, 1, context=127, logits=1)
    prefill = client_update.forward_flops(cfg, 127, logits=1)
    assert client_update.generation_flops(cfg, 127, 2) == pytest.approx(prefill + step)


def _reference_prompt(question, options):
    # The layout of the reference's ARC prompts (spear_fl.data._arc_to_ex).
    lines = "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", options))
    return (
        "Answer the multiple-choice question by choosing the best option.\n"
        "Respond with ONLY the letter (A, B, C, or D).\n\n"
        f"[QUESTION]\n{question}\n\n[OPTIONS]\n{lines}\n\nAnswer:"
    )


_ITEMS = [
    ("Which is a gas at room temperature?", ["iron", "oxygen", "salt", "wood"]),
    ("What does a plant need\nto make food?", ["sunlight", "sand", "rocks", "noise"]),
]


def _refbench_client(path, reps):
    summary = {
        "total_seconds": {"median": 200.0},
        "generation_seconds": {"median": 140.0},
        "feedback_seconds": {"median": 1.0},
        "train_phase_seconds": {"median": 59.0},
        "generated_tokens": {"median": 2000},
    }
    data = {
        "summary": summary,
        "reps": [{"warmup": i == 0, "train_tokens_real": 1000 + 100 * i} for i in range(reps)],
        "peak_rss_mib_process": 3100.0,
        "env": {"cpu": "some CPU"},
    }
    data["reps"][0]["gen_calls_detail"] = [
        {"kind": "y0", "prompts": [_reference_prompt(q, o) for q, o in _ITEMS]},
        {"kind": "revision", "prompts": ["a revision prompt"]},
    ]
    path.write_text(json.dumps(data))


def test_reference_figures_read_refbench_output(tmp_path):
    path = tmp_path / "client.json"
    _refbench_client(path, reps=4)
    ref = client_update.reference_figures(str(path))
    assert ref["total_s"] == 200.0 and ref["generation_s"] == 141.0 and ref["training_s"] == 59.0
    assert ref["trained_tokens"] == 1200  # median of the timed repetitions, not the warm-up
    assert ref["process_peak_rss_mib"] == 3100.0 and ref["cpu"] == "some CPU"
    assert ref["questions"] == [{"question": q, "options": o} for q, o in _ITEMS]
    data = json.loads(path.read_text())
    data["reps"][0]["gen_calls_detail"][0]["prompts"][1] = _reference_prompt("Q?", ["x"]).replace(
        "A. x", "x"
    )
    (tmp_path / "odd.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"odd\.json: .*an \[OPTIONS\] line is not 'X\. text'"):
        client_update.reference_figures(str(tmp_path / "odd.json"))
    data["reps"][0]["gen_calls_detail"] = data["reps"][0]["gen_calls_detail"][1:]
    (tmp_path / "none.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no first-answer prompts recorded"):
        client_update.reference_figures(str(tmp_path / "none.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad\.json: not a refbench client\.json"):
        client_update.reference_figures(str(tmp_path / "bad.json"))


def test_the_reference_questions_select_the_same_items_in_its_order():
    from fedsp.data import Example

    def example(uid, question, options):
        return Example(uid=uid, question=question, answer="A", choices=tuple(options))

    pool = [
        example("x", "Which is a gas at room temperature?", ["iron", "oxygen", "salt"]),
        example(
            "b", "What does a plant need  to make food?", ["sunlight", "sand", "rocks", "noise"]
        ),
        example("a", _ITEMS[0][0], _ITEMS[0][1]),
        example("c", "Unrelated?", ["1", "2", "3", "4"]),
    ]
    items = [{"question": q, "options": o} for q, o in _ITEMS]
    # Same question but other options is not a match; whitespace is normalised.
    assert [e.uid for e in client_update.matching_examples(pool, items)] == ["a", "b"]
    with pytest.raises(ValueError, match="no ARC-Challenge test item matches 'Gone\\?'"):
        client_update.matching_examples(pool, [{"question": "Gone?", "options": ["1", "2"]}])
