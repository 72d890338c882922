"""Tests for fedsp.model.tokenizer.

Small byte-level BPE tokenizers are trained here (one per llama.cpp pre-tokenizer family), so
the tests run offline in seconds. A tokenizer's GGUF metadata is written with the ``gguf``
writer directly and read back two ways: by fedsp (``Tokenizer.from_gguf``) and by
transformers' own GGUF reader; both must give the ids of the original tokenizer. The real
SmolLM2 vocabulary is checked in ``test_smollm2.py`` (slow).
"""

from __future__ import annotations

import pathlib

import gguf
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from fedsp.model.tokenizer import Tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 34 = 46, 100 - 1 = 99, 2024 and 1999.",
    "Don't stop: it's what we're told. Qu'est-ce que c'est? Naïve café, 東京, Zürich!",
    "def f(x):\n    return x * 42\n\n\nprint(f(3.14159))\t# tabs\tand  double  spaces",
    "User: what is 7 * 8? Assistant: 56. User: and 123 * 4? Assistant: 492.",
] * 20
PROBES = [
    "Hello world",
    "12345 + 678 = 9000",
    "  leading and trailing  ",
    "naïve café — 東京 🚀 Zürich",
    "tabs\tand\nnewlines\n\n\nend",
    "don't I'll WE'RE",
    "<|im_start|>user\nhi<|im_end|>\n",
    "x=3.14159e-10; y = -42",
    "",
]
# The pre-tokenizer each GGUF pre type stands for, written independently of fedsp
# (from the corresponding Hugging Face tokenizer.json files).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    ),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3),
    "qwen2": lambda: _split_then_bytes(_QWEN2),
}


def train_tokenizer(pre: str, vocab_size: int = 420) -> transformers.PreTrainedTokenizerFast:
    """A ChatML byte-level BPE trained on a small corpus with the ``pre`` family's splitting."""
    backend = tokenizers.Tokenizer(models.BPE())
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
        clean_up_tokenization_spaces=False,
    )


def write_tokenizer_gguf(path: pathlib.Path, metadata: dict) -> pathlib.Path:
    """A tensor-free GGUF holding only tokenizer metadata, typed as llama.cpp writes it."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("tokenizer.ggml.model", metadata["tokenizer.ggml.model"])
    writer.add_string("tokenizer.ggml.pre", metadata["tokenizer.ggml.pre"])
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_token_merges(metadata["tokenizer.ggml.merges"])
    writer.add_bos_token_id(metadata["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(metadata["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(metadata["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(metadata["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(metadata["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(metadata["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def chatml() -> Tokenizer:
    return Tokenizer(train_tokenizer("smollm"))


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_gguf_tokenizer_reproduces_original_ids(pre, tmp_path):
    original = train_tokenizer(pre)
    metadata = Tokenizer(original).gguf_metadata()
    assert metadata["tokenizer.ggml.pre"] == pre
    path = write_tokenizer_gguf(tmp_path / "tok.gguf", metadata)

    ours = Tokenizer.from_gguf(path)
    for text in PROBES:
        expected = original.encode(text, add_special_tokens=False)
        assert ours.encode(text) == expected, (pre, text)
        assert ours.decode(expected, skip_special_tokens=False) == text
    assert ours.eos_token_ids == (0, 2)  # <|endoftext|>, <|im_end|>
    assert (ours.bos_token_id, ours.pad_token_id, ours.vocab_size) == (1, 0, len(original))
    assert ours.gguf_metadata() == metadata


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2"])
def test_gguf_tokenizer_matches_transformers_gguf_reader(pre, tmp_path):
    # transformers ignores the digit isolation of "smollm"-type files (it treats them as
    # GPT-2); llama.cpp and the original tokenizer do isolate, so that case is checked
    # against the original above and in test_digits_are_isolated_for_smollm_pre_type.
    path = write_tokenizer_gguf(
        tmp_path / "tok.gguf", Tokenizer(train_tokenizer(pre)).gguf_metadata()
    )
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    ours = Tokenizer.from_gguf(path)
    conversation = [{"role": "user", "content": "What is 12 * 3?"}]
    texts = [
        *PROBES,
        reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True),
    ]
    for text in texts:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), (pre, text)
    assert ours.apply_chat_template(conversation) == texts[-1]


def test_digits_are_isolated_for_smollm_pre_type(tmp_path):
    original = train_tokenizer("smollm")
    path = write_tokenizer_gguf(tmp_path / "tok.gguf", Tokenizer(original).gguf_metadata())
    ours = Tokenizer.from_gguf(path)
    ids = ours.encode("x 2024 y")
    assert ours.hf.convert_ids_to_tokens(ids)[:6] == ["x", "Ġ", "2", "0", "2", "4"]
    # The gpt-2 family, by contrast, merges digit runs this corpus made frequent.
    gpt2 = Tokenizer(train_tokenizer("gpt-2"))
    assert "Ġ2024" in gpt2.hf.convert_ids_to_tokens(gpt2.encode("x 2024 y"))


def test_from_gguf_rejects_unsupported_tokenizers(chatml):
    metadata = chatml.gguf_metadata()
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model='llama'"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"unsupported tokenizer.ggml.pre='tekken'"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.pre": "tekken"})
    without_merges = {k: v for k, v in metadata.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ValueError, match=r"no 'tokenizer.ggml.merges'"):
        Tokenizer.from_gguf(without_merges)


def test_encode_batch_left_and_right_padding(chatml):
    texts = ["What is 7 * 8?", "hi", "Naïve 東京 2024!"]
    rows = [chatml.encode(t) for t in texts]
    width = max(map(len, rows))
    pad = chatml.pad_token_id

    ids, mask = chatml.encode_batch(texts)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, width)
    for i, row in enumerate(rows):
        n = len(row)
        np.testing.assert_array_equal(ids[i, width - n :], row)
        np.testing.assert_array_equal(ids[i, : width - n], pad)
        np.testing.assert_array_equal(mask[i], [0] * (width - n) + [1] * n)
    # Left padding: every row's last token is in the last column.
    np.testing.assert_array_equal(ids[:, -1], [r[-1] for r in rows])

    ids, mask = chatml.encode_batch(texts, left_pad=False)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(ids[i, : len(row)], row)
        np.testing.assert_array_equal(mask[i], [1] * len(row) + [0] * (width - len(row)))
    assert chatml.batch_decode(ids, mask) == texts


def test_encode_batch_fixed_length_truncates_the_right_end(chatml):
    texts = ["What is 7 * 8? Please answer.", "hi"]
    long_row, short_row = (chatml.encode(t) for t in texts)
    assert len(long_row) > 4

    ids, mask = chatml.encode_batch(texts, max_length=4)
    assert ids.shape == (2, 4)
    np.testing.assert_array_equal(ids[0], long_row[-4:])  # a prompt keeps its end
    np.testing.assert_array_equal(mask[0], 1)
    np.testing.assert_array_equal(ids[1, 4 - len(short_row) :], short_row)

    ids, _ = chatml.encode_batch(texts, max_length=4, left_pad=False)
    np.testing.assert_array_equal(ids[0], long_row[:4])

    wide, wide_mask = chatml.encode_batch(texts, max_length=64)
    assert wide.shape == (2, 64) and wide_mask.sum() == len(long_row) + len(short_row)


def test_encode_batch_rejects_bad_input(chatml):
    with pytest.raises(ValueError, match="texts: expected a sequence of strings"):
        chatml.encode_batch("just one string")
    with pytest.raises(ValueError, match="max_length=0"):
        chatml.encode_batch(["a"], max_length=0)
    with pytest.raises(ValueError, match=r"ids: expected shape \[B, T\]"):
        chatml.batch_decode(np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="mask: expected shape"):
        chatml.batch_decode(np.zeros((2, 3), np.int32), np.ones((2, 2)))


def test_apply_chat_template_forms(chatml):
    one = chatml.apply_chat_template("What is 2+2?")
    assert one == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert chatml.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )
    batch = chatml.apply_chat_template(["What is 2+2?", "hi"])
    assert batch == [one, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]
    assert (
        chatml.apply_chat_template([messages, messages])
        == [chatml.apply_chat_template(messages)] * 2
    )
    ids = chatml.encode(one)
    assert ids[0] == chatml.bos_token_id and chatml.eos_token_ids[1] in ids  # specials stay whole
    with pytest.raises(ValueError, match="conversations: expected"):
        chatml.apply_chat_template([[{"text": "no role"}]])


def test_no_chat_template_is_a_clear_error():
    hf = train_tokenizer("gpt-2")
    hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(hf).apply_chat_template("hi")


def test_save_pretrained_round_trip(chatml, tmp_path):
    chatml.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 1]}')
    loaded = Tokenizer.from_pretrained(tmp_path)
    for text in PROBES:
        assert loaded.encode(text) == chatml.encode(text)
    assert loaded.chat_template == chatml.chat_template
    # generation_config.json's EOS ids join the tokenizer's own.
    assert loaded.eos_token_ids == (0, 1, 2)
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_pretrained(tmp_path / "missing")
