"""Tasks: registry, loaders on the real files, hub dispatch, prompts, correctness, bad input."""

from __future__ import annotations

import collections
import json
import operator
import re
import sys

import pytest

from fedsp import data
from fedsp.data import sources

# Counts from /work/shared/data/README.md and the SOURCE.txt files.
SPLIT_SIZES = [
    ("gsm8k", "train", 7473),
    ("gsm8k", "test", 1319),
    ("arc_challenge", "test", 1172),
    ("hellaswag", "validation", 10042),
    ("strategyqa", "train", 2061),
    ("strategyqa", "dev", 229),
    ("math", "train", 7500),
    ("math", "test", 5000),
    ("math", "math500", 500),
]


def test_registry_lists_the_builtin_tasks():
    assert data.task_names() == (
        "arc_challenge",
        "arithmetic",
        "gsm8k",
        "hellaswag",
        "math",
        "strategyqa",
        "ultrachat",
    )
    assert data.DEFAULT_TASK == "arithmetic"
    assert isinstance(data.get_task("gsm8k", source="local"), data.FileTask)


def test_unknown_task_and_option_raise_naming_them():
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*arc_challenge, arithmetic, gsm8k"):
        data.get_task("gsm9k")
    with pytest.raises(ValueError, match=r"task 'gsm8k' has no option\(s\) \['digits'\]"):
        data.get_task("gsm8k", digits=3)
    with pytest.raises(ValueError, match="source must be one of"):
        data.get_task("gsm8k", source="ftp")


@pytest.mark.parametrize("name, split, size", SPLIT_SIZES)
def test_loader_counts_match_the_readme(load_split, name, split, size):
    examples = load_split(name, split)
    assert len(examples) == size
    assert len({ex.uid for ex in examples}) == size


@pytest.mark.parametrize("name, split", [(n, s) for n, s, _ in SPLIT_SIZES])
def test_every_gold_response_is_judged_correct(load_split, name, split):
    # End-to-end check of loading + extraction + normalisation on every real item.
    task = data.get_task(name)
    wrong = [ex.uid for ex in load_split(name, split) if not task.is_correct(ex.gold_response, ex)]
    assert wrong == []


def test_label_distributions_match_the_source_notes(load_split):
    hellaswag = collections.Counter(ex.answer for ex in load_split("hellaswag", "validation"))
    assert hellaswag == {"A": 2515, "B": 2485, "C": 2584, "D": 2458}
    assert collections.Counter(ex.answer for ex in load_split("strategyqa", "train")) == {
        "yes": 964,
        "no": 1097,
    }
    assert collections.Counter(ex.answer for ex in load_split("strategyqa", "dev")) == {
        "yes": 107,
        "no": 122,
    }
    levels = collections.Counter(ex.meta["level"] for ex in load_split("math", "test"))
    assert levels == {1: 437, 2: 894, 3: 1131, 4: 1214, 5: 1324}
    assert collections.Counter(ex.meta["level"] for ex in load_split("math", "train"))[None] == 2
    assert collections.Counter(len(ex.choices) for ex in load_split("arc_challenge", "test")) == {
        4: 1165,
        3: 4,
        5: 3,
    }
    arc = load_split("arc_challenge", "test")
    assert all(ex.answer in "ABCDE"[: len(ex.choices)] and ex.label == ex.answer for ex in arc)


def test_first_records_parse_to_known_values(load_split):
    gsm = load_split("gsm8k", "test")[0]
    assert (gsm.answer, gsm.label) == ("18", "2")
    assert gsm.gold_response == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\nAnswer: 18"
    )
    assert sum(ex.answer == "70000" for ex in load_split("gsm8k", "test")[:3]) == 1
    # Thousands separators in '#### 1,080' style golds are canonicalised.
    assert all("," not in ex.answer for ex in load_split("gsm8k", "train"))
    arc = load_split("arc_challenge", "test")[0]
    assert (arc.uid, arc.answer, arc.choices[2]) == (
        "Mercury_7175875",
        "C",
        "Planetary days will become shorter.",
    )
    math500 = load_split("math", "math500")[0]
    assert (math500.uid, math500.answer, math500.label) == (
        "test/precalculus/807.json",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "Precalculus",
    )
    sqa = load_split("strategyqa", "dev")[0]
    assert sqa.answer == "no" and sqa.gold_response.endswith("people.\nAnswer: no")


def test_limit_takes_a_seeded_subset_in_file_order():
    task = data.get_task("gsm8k")
    full = task.load("test")
    a, b, c = (
        task.load("test", limit=50, seed=1),
        task.load("test", limit=50, seed=1),
        task.load("test", limit=50, seed=2),
    )
    assert a == b and a != c and len(a) == 50
    positions = [full.index(ex) for ex in a]
    assert positions == sorted(positions)
    assert task.load("test", limit=10**6) == full


def test_split_slices_are_disjoint_and_cover_the_split(load_split):
    # ARC-Challenge has only its test file offline; the tables train on "test[:75%]" and
    # evaluate on "test[75%:]".
    task = data.get_task("arc_challenge", source="local")
    full = list(load_split("arc_challenge", "test"))
    head, tail = task.load("test[:75%]"), task.load("test[75%:]")
    assert len(full) == 1172 and (len(head), len(tail)) == (879, 293)  # round(0.75 * 1172)
    assert head + tail == full
    assert not {ex.uid for ex in head} & {ex.uid for ex in tail}
    assert task.load("test[10:20]") == full[10:20]
    assert task.load("test[-5%:]") == full[-59:]  # round(0.05 * 1172) = 59
    assert task.load("test[:75%]", limit=8, seed=3) == data.base.subset(head, 8, 3)
    # uids are the whole split's: a slice's examples keep their positions' ids
    gsm = data.get_task("gsm8k")
    assert [ex.uid for ex in gsm.load("test[100:102]")] == ["gsm8k/test/100", "gsm8k/test/101"]


@pytest.mark.parametrize(
    "split, message",
    [
        ("dev[:50%]", "split must be one of"),
        ("test[:50]x", "split must be one of"),
        ("test[200%:]", "outside -100%..100%"),
        ("test[5:5]", "is empty"),
    ],
)
def test_bad_split_slices_raise(split, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        data.get_task("arc_challenge", source="local").load(split)


def test_generated_tasks_take_no_slices():
    task = data.get_task("arithmetic")
    assert task.has_split("test") and not task.has_split("test[:50%]")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\) for task"):
        task.load("test[:50%]")


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_bad_limit_raises(limit):
    with pytest.raises(ValueError, match="limit must be None or a positive integer"):
        data.get_task("gsm8k").load("test", limit=limit)


def test_unknown_split_raises_naming_the_splits():
    with pytest.raises(
        ValueError,
        match=r"split must be one of \('train', 'test'\) or a slice such as "
        r"'test\[:75%\]' for task 'gsm8k', got 'dev'",
    ):
        data.get_task("gsm8k").load("dev")


def test_missing_data_dir_names_path_setting_and_online_alternative(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataNotFoundError) as err:
        data.get_task("gsm8k", source="local").load("test", data_dir=missing)
    message = str(err.value)
    for needle in (
        str(missing),
        "does not exist",
        "data_dir",
        "FEDSP_DATA_DIR",
        "gsm8k/test.jsonl",
        "pip install 'fedsp[data]'",
        "openai/gsm8k",
    ):
        assert needle in message


def test_unset_data_dir_is_reported(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    with pytest.raises(
        data.DataNotFoundError, match=r"no data directory is set .*FEDSP_DATA_DIR is unset"
    ):
        data.get_task("strategyqa", source="local").load("dev")


def test_auto_without_datasets_package_explains_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(data.DataNotFoundError) as err:
        data.get_task("gsm8k").load("test", data_dir=tmp_path)
    assert "Hub load failed: ImportError" in str(err.value) and "fedsp[data]" in str(err.value)
    assert isinstance(err.value.__cause__, ImportError)


def test_split_without_local_file_points_to_the_hub(tmp_path):
    with pytest.raises(
        data.DataNotFoundError,
        match=r"arc_challenge split 'validation': there is no local file "
        r"for this split .*allenai/ai2_arc",
    ):
        data.get_task("arc_challenge", source="local").load("validation", data_dir=tmp_path)


def test_empty_split_raises(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n")
    with pytest.raises(
        ValueError, match=r"split 'test' of task 'gsm8k' is empty \(read from .*test.jsonl\)"
    ):
        data.get_task("gsm8k").load("test", data_dir=tmp_path)


class _FakeHub:
    """Stands in for `datasets.load_dataset`: records calls, returns canned HF-schema rows."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def __call__(self, path, name, split):
        self.calls.append((path, name, split))
        return [dict(r) for r in self.rows]


def test_hub_dispatch_gsm8k(tmp_path, monkeypatch):
    fake = _FakeHub([{"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}])
    monkeypatch.setattr(sources, "hub_dataset", fake)
    examples = data.get_task("gsm8k").load(
        "test", data_dir=tmp_path
    )  # empty dir: falls back to the hub
    assert fake.calls == [("openai/gsm8k", "main", "test")]
    assert [(ex.question, ex.answer, ex.gold_response) for ex in examples] == [
        ("2+2?", "4", "2+2=4\nAnswer: 4")
    ]


def test_hub_dispatch_ultrachat_first_turn_is_the_gold_response(monkeypatch):
    turns = [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Sure."},
    ]
    fake = _FakeHub([{"prompt": "Hi?", "prompt_id": "abc", "messages": turns}])
    monkeypatch.setattr(sources, "hub_dataset", fake)
    task = data.get_task("ultrachat")
    (ex,) = task.load("train_sft")
    assert fake.calls == [("HuggingFaceH4/ultrachat_200k", None, "train_sft")]
    assert (ex.uid, ex.question, ex.gold_response, ex.label) == (
        "ultrachat/train_sft/abc",
        "Hi?",
        "Hello.",
        "2",
    )
    assert task.messages(ex) == [{"role": "user", "content": "Hi?"}]
    assert not task.is_correct("Hello.", ex) and task.source == "hub"


def test_hub_is_not_touched_when_the_local_file_exists(monkeypatch):
    def fail(*args):
        raise AssertionError("the hub must not be read")

    monkeypatch.setattr(sources, "hub_dataset", fail)
    assert len(data.get_task("gsm8k").load("test", limit=3)) == 3
    fake = _FakeHub([{"question": "q", "answer": "#### 1"}])
    monkeypatch.setattr(sources, "hub_dataset", fake)
    assert len(data.get_task("gsm8k", source="hub").load("test")) == 1  # forced hub


def test_hub_dispatch_arc_relabels_numeric_options(tmp_path, monkeypatch):
    row = {
        "id": "NYSED_1",
        "question": "q?",
        "answerKey": "3",
        "choices": {"text": ["w", "x", "y", "z"], "label": ["1", "2", "3", "4"]},
    }
    fake = _FakeHub([row])
    monkeypatch.setattr(sources, "hub_dataset", fake)
    (ex,) = data.get_task("arc_challenge").load("train", data_dir=tmp_path)
    assert fake.calls == [("allenai/ai2_arc", "ARC-Challenge", "train")]
    assert (ex.uid, ex.answer, ex.choices, ex.label) == ("NYSED_1", "C", ("w", "x", "y", "z"), "C")


def test_hub_dispatch_hellaswag_preprocesses_like_lm_eval(tmp_path, monkeypatch):
    row = {
        "ind": 7,
        "activity_label": "Cooking",
        "ctx": "[header] Boil water [title] Add pasta.",
        "endings": ["stir it.", "[step] eat  it.", "x", "y"],
        "label": "1",
        "ctx_a": "",
        "ctx_b": "",
    }
    monkeypatch.setattr(sources, "hub_dataset", _FakeHub([row]))
    (ex,) = data.get_task("hellaswag").load("validation", data_dir=tmp_path)
    assert ex.question == "Cooking: Boil water. Add pasta."
    assert ex.choices[1] == "eat it." and ex.answer == "B" and ex.uid == "hellaswag/validation/7"


def test_hub_dispatch_math_reads_every_subject_and_math500(tmp_path, monkeypatch):
    fake = _FakeHub(
        [{"problem": "p", "level": "Level 2", "type": "Algebra", "solution": "so $\\boxed{3}$"}]
    )
    monkeypatch.setattr(sources, "hub_dataset", fake)
    examples = data.get_task("math").load("test", data_dir=tmp_path)
    assert [c[1] for c in fake.calls] == list(data.competition_math.SUBJECTS)
    assert {c[0] for c in fake.calls} == {"EleutherAI/hendrycks_math"} and len(examples) == 7
    assert (
        examples[0].uid == "hub/test/algebra/0"
        and examples[0].answer == "3"
        and examples[0].meta["level"] == 2
    )
    fake.calls.clear()
    data.get_task("math").load("math500", data_dir=tmp_path)
    assert fake.calls == [("HuggingFaceH4/MATH-500", None, "test")]


def test_hub_dispatch_strategyqa_downloads_the_pinned_file(tmp_path, monkeypatch):
    path = tmp_path / "dev.json"
    path.write_text(
        json.dumps(
            [{"qid": "q1", "question": "Is ice cold?", "answer": True, "facts": ["Ice is 0 C"]}]
        )
    )
    urls = []
    monkeypatch.setattr(sources, "hub_file", lambda url: urls.append(url) or path)
    (ex,) = data.get_task("strategyqa").load("dev", data_dir=tmp_path / "empty")
    assert urls == [
        "https://raw.githubusercontent.com/eladsegal/strategyqa/"
        "1ba1e97452e189569357876f2854b01357ffbe37/data/strategyqa/dev.json"
    ]
    assert (ex.uid, ex.answer, ex.gold_response) == ("q1", "yes", "Ice is 0 C.\nAnswer: yes")


def test_hub_errors_are_wrapped_with_the_local_attempt(tmp_path, monkeypatch):
    def offline(*args):
        raise ConnectionError("no network")

    monkeypatch.setattr(sources, "hub_dataset", offline)
    with pytest.raises(
        data.DataNotFoundError,
        match=r"gsm8k/test.jsonl does not exist.*ConnectionError: no network",
    ):
        data.get_task("gsm8k").load("test", data_dir=tmp_path)


def test_messages_for_first_attempt_and_revisions():
    task = data.get_task("arithmetic")
    ex = data.Example(uid="u", question="What is 2 + 2?", answer="4")
    assert task.messages(ex) == [
        {
            "role": "system",
            "content": "Solve the arithmetic problem. End your reply with 'Answer: <number>'.",
        },
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    revision = task.messages(
        ex, previous=["Answer: 5", "Answer: 3"], feedback=["Too high.", "Too low."]
    )
    assert [m["role"] for m in revision] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert revision[2]["content"] == "Answer: 5"
    assert (
        revision[5]["content"]
        == "Too low.\nPlease try again. End your reply with 'Answer: <number>'."
    )
    assert (
        task.messages(ex, previous="Answer: 5")[-1]["content"]
        == "Please try again. End your reply with 'Answer: <number>'."
    )
    merged = data.get_task("arithmetic", system_prompt=False).messages(ex)
    assert merged == [{"role": "user", "content": f"{task.instruction}\n\nWhat is 2 + 2?"}]
    with pytest.raises(ValueError, match="one entry per previous attempt"):
        task.messages(ex, feedback="Too high.")
    with pytest.raises(ValueError, match="got 1 feedback and 2 previous"):
        task.messages(ex, feedback=["a"], previous=["x", "y"])


def test_multiple_choice_prompt_and_loglikelihood_choices(load_split):
    arc_task, arc = data.get_task("arc_challenge"), load_split("arc_challenge", "test")[0]
    assert arc_task.prompt(arc).endswith(
        "Options:\nA. Planetary density will decrease.\nB. Planetary years will "
        "become longer.\nC. Planetary days will become shorter.\nD. Planetary "
        "gravity will become stronger."
    )
    context, continuations, gold = arc_task.choices(arc)
    assert context == f"Question: {arc.question}\nAnswer:" and gold == 2
    assert continuations[2] == " Planetary days will become shorter."
    hs_task, hs = data.get_task("hellaswag"), load_split("hellaswag", "validation")[0]
    assert hs_task.choices(hs) == (
        "Roof shingle removal: A man is sitting on a roof. he",
        [f" {e}" for e in hs.choices],
        3,
    )
    with pytest.raises(NotImplementedError, match="'gsm8k' is not multiple choice"):
        data.get_task("gsm8k").choices(load_split("gsm8k", "test")[0])


def test_spear_prompt_style_is_the_reference_prompt(load_split):
    arc = load_split("arc_challenge", "test")[0]
    task = data.get_task("arc_challenge", prompt_style="spear")
    # spear_fl.data._arc_to_ex's prompt, under spear_fl.prompting's default system turn.
    reference = (
        "Answer the multiple-choice question by choosing the best option.\n"
        "Respond with ONLY the letter (A, B, C, or D).\n\n"
        f"[QUESTION]\n{arc.question}\n\n"
        "[OPTIONS]\nA. Planetary density will decrease.\nB. Planetary years will become "
        "longer.\nC. Planetary days will become shorter.\nD. Planetary gravity will become "
        "stronger.\n\nAnswer:"
    )
    assert task.messages(arc) == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": reference},
    ]
    # A revision is a chat turn ending in the reference's ARC revision instruction.
    assert task.messages(arc, previous="B", feedback="Not B.")[2:] == [
        {"role": "assistant", "content": "B"},
        {
            "role": "user",
            "content": "Not B.\nPlease try again. Answer with a single letter choice like "
            '"A", "B", "C", or "D".',
        },
    ]
    assert task.is_correct("C", arc) and task.is_correct("C. Planetary days", arc)
    three = data.Example(uid="t", question="Q?", answer="A", choices=("x", "y", "z"))
    assert "Respond with ONLY the letter (A, B, or C)." in task.prompt(three)
    hs_task = data.get_task("hellaswag", prompt_style="spear")
    hs = load_split("hellaswag", "validation")[0]
    assert hs_task.prompt(hs).startswith(
        "Choose the best continuation of the context. Respond with ONLY the letter "
        f"(A, B, C, or D).\n\n[CONTEXT]\n{hs.question}\n\n[OPTIONS]\nA. "
    )
    # The default is unchanged, and a bad style names the option.
    assert data.get_task("arc_challenge").prompt(arc).startswith(arc.question)
    with pytest.raises(ValueError, match="prompt_style must be one of"):
        data.get_task("arc_challenge", prompt_style="reference")


def test_multiple_choice_correctness_by_letter_number_or_text(load_split):
    task, ex = data.get_task("arc_challenge"), load_split("arc_challenge", "test")[0]  # gold C
    assert task.is_correct("Answer: C", ex) and task.is_correct("Answer: 3", ex)
    assert task.is_correct("Answer: planetary days will become shorter", ex)
    assert not task.is_correct("Answer: B", ex) and not task.is_correct(
        "Answer: E", ex
    )  # E is not an option
    assert task.predict("Answer: E", ex) is None
    # Quoting two options is ambiguous.
    assert (
        task.predict("Planetary days will become shorter or planetary years will become longer", ex)
        is None
    )


@pytest.mark.parametrize(
    "name, reply, gold, correct",
    [
        ("gsm8k", "Answer: $1,000.00", "1000", True),
        ("gsm8k", "Answer: 1000.5", "1000", False),
        ("gsm8k", "#### 18", "18", True),
        ("arithmetic", "85.0", "85", True),
        ("arithmetic", "Answer: -85", "85", False),
        ("strategyqa", "Answer: True", "yes", True),
        ("strategyqa", "Answer: no", "yes", False),
        ("math", "\\boxed{0.5}", "\\frac{1}{2}", True),
        ("math", "\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", True),
        ("math", "\\boxed{(1,2)}", "(2,1)", False),
    ],
)
def test_is_correct_golden(name, reply, gold, correct):
    assert (
        data.get_task(name).is_correct(reply, data.Example(uid="u", question="q", answer=gold))
        is correct
    )


def test_arithmetic_is_deterministic_and_correct():
    task = data.get_task("arithmetic")
    a, b = task.load("train", limit=300, seed=3), task.load("train", limit=300, seed=3)
    assert a == b and a != task.load("train", limit=300, seed=4)
    fns = {"add": operator.add, "sub": operator.sub, "mul": operator.mul}
    for ex in a:
        x, y, op = ex.meta["a"], ex.meta["b"], ex.meta["op"]
        assert ex.answer == str(fns[op](x, y)) and ex.label == op
        assert ex.question == f"What is {x} {dict(add='+', sub='-', mul='*')[op]} {y}?"
        assert task.is_correct(ex.gold_response, ex)
        digits = {"add": (2, 2), "sub": (2, 2), "mul": (2, 1)}[op]
        assert (len(str(x)), len(str(y))) == digits
        assert op != "sub" or x >= y  # allow_negative=False
    assert len(task.load("train")) == 2000 and len(task.load("test")) == 300


def test_arithmetic_train_and_test_problems_are_disjoint():
    task = data.get_task("arithmetic")
    problems = lambda exs: {(ex.meta["op"], ex.meta["a"], ex.meta["b"]) for ex in exs}  # noqa: E731
    train = problems(task.load("train", seed=0)) | problems(task.load("train", seed=1))
    test = problems(task.load("test", seed=0)) | problems(task.load("test", seed=5))
    assert len(test) > 100 and not train & test


def test_arithmetic_mix_and_digits_options():
    task = data.get_task(
        "arithmetic",
        operations=("add", "mul"),
        mix={"add": 3, "mul": 1},
        digits={"add": 3, "mul": (1, 1)},
    )
    examples = task.load("train", limit=101)
    assert collections.Counter(ex.label for ex in examples) == {
        "add": 76,
        "mul": 25,
    }  # 75.75 / 25.25
    assert all(len(str(ex.meta["a"])) == (3 if ex.label == "add" else 1) for ex in examples)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"operations": ("add", "div")}, "operations"),
        ({"operations": ()}, "operations"),
        ({"digits": {"add": 0}}, "digits"),
        ({"digits": {"mul": 2}, "operations": ("add",)}, "digits"),
        ({"mix": {"add": 1.0}}, "mix"),
        ({"mix": {"add": -1, "sub": 1, "mul": 1}}, "mix"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"num_train": 0}, "num_train"),
        ({"digits": {"sub": (1, 2)}}, "allow_negative"),
    ],
)
def test_arithmetic_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        data.get_task("arithmetic", **options)


def test_sft_pairs_from_gsm8k_train(load_split):
    task = data.get_task("gsm8k")
    examples = data.subset(load_split("gsm8k", "train"), 5, seed=0)
    pairs = data.sft_pairs(task, examples)
    assert [p[0] for p in pairs] == [task.messages(ex) for ex in examples]
    assert all(
        resp == ex.gold_response and resp.endswith(f"Answer: {ex.answer}") and "<<" not in resp
        for (_, resp), ex in zip(pairs, examples, strict=True)
    )
    with pytest.raises(ValueError, match="have no gold_response"):
        data.sft_pairs(task, [data.Example(uid="x", question="q", answer="")])
    with pytest.raises(ValueError, match="examples is empty"):
        data.sft_pairs(task, [])


def test_chat_prompts_are_prompts_only():
    prompts = data.load_chat_prompts()
    assert len(prompts) == 385 and all(
        ex.answer == "" and ex.gold_response is None for ex in prompts
    )
    # SOURCE.txt gives the classes without their sub-classes ("Commonsense-Easy" ...).
    assert collections.Counter(ex.label.split("-")[0] for ex in prompts) == {
        "Vicuna": 80,
        "Writing": 80,
        "Commonsense": 60,
        "World Knowledge": 60,
        "Professional Knowledge": 45,
        "Ability Math": 30,
        "Ability Reasoning": 30,
    }
    assert data.chat_messages(prompts[0]) == [{"role": "user", "content": prompts[0].question}]
    assert len(data.load_chat_prompts(limit=10, seed=1)) == 10
