"""Tokenizer: chat formatting and fixed-layout batch encoding over a Hugging Face fast tokenizer.

:class:`Tokenizer` wraps a ``transformers.PreTrainedTokenizerFast`` and adds what self-play
needs around it: chat-template formatting of prompts, batches encoded to numpy ``int32``
arrays with left padding (so every row's last prompt token sits in the same column and
generation starts at one position for the whole batch), decoding under a mask, and the full
set of ids that end a reply.

It is built from a Hugging Face directory (``AutoTokenizer``) or from a GGUF file's metadata.
transformers' own GGUF tokenizer reader imports torch, which fedsp does not require, so
:meth:`Tokenizer.from_gguf` rebuilds the byte-level BPE with the ``tokenizers`` library from
``tokenizer.ggml.tokens``/``merges``/``token_type``, the special-token ids and
``tokenizer.chat_template``, splitting text before BPE the way llama.cpp does for the file's
``tokenizer.ggml.pre`` type (``llama-vocab.cpp``): SmolLM/StarCoder isolate every digit,
Llama 3 keeps runs of up to three, Qwen2 isolates digits after NFC normalization. (For
"smollm" files this is what SmolLM2's own ``tokenizer.json`` does, ``Digits`` before
``ByteLevel``; transformers' GGUF reader skips the digit split, so it differs from both on
numerals that have a space-prefixed token, such as " ½".)
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from fedsp.model.gguf import read_gguf_metadata

__all__ = ["Message", "Tokenizer"]

Message = Mapping[str, str]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""

# Pre-tokenizer regexes from llama.cpp's llama-vocab.cpp (identical to the tokenizer.json
# of the corresponding Hugging Face models).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> pre-tokenizer family; the first name of each family is what
# gguf_metadata() writes.
_PRE_FAMILIES: dict[str, tuple[str, ...]] = {
    "digits": ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
    "gpt2": ("gpt-2", "default", "mpt", "olmo", "jais"),
    "llama3": ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"),
    "qwen2": ("qwen2", "deepseek-r1-qwen", "stablelm2"),
}
_PRE_TO_FAMILY = {name: family for family, names in _PRE_FAMILIES.items() for name in names}
# Probe text that tells the families apart by how they split it (digit runs, contractions,
# blank runs, newlines, non-ASCII letters).
_PRE_PROBE = "Hello  world 12345 it's\n\n  \u00fcn\u00efcode 3.14 DON'T?! a\tb   "
# llama.cpp token types (llama.h: LLAMA_TOKEN_TYPE_*).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# Special tokens that end a turn or a document in common chat formats; any present in the
# vocabulary counts as an end of reply (SmolLM2/Qwen ChatML, Llama 3, Phi-3, Gemma).
_END_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
)


class Tokenizer:
    """A fast tokenizer with chat formatting and numpy batch encoding.

    Args:
      hf: the tokenizer to wrap.
      extra_eos_token_ids: more ids that end a reply (e.g. from ``generation_config.json``).

    Attributes:
      hf: the wrapped ``transformers.PreTrainedTokenizerFast``.
      eos_token_ids: every id that ends a reply (tuple, sorted): the tokenizer's EOS,
        GGUF ``eot``/``eom`` ids, ``generation_config.json`` EOS ids, and the end-of-turn
        and end-of-text specials of common chat formats present in the vocabulary
        (for SmolLM2-Instruct: ``<|endoftext|>`` and ChatML's ``<|im_end|>``).
    """

    def __init__(
        self, hf: transformers.PreTrainedTokenizerFast, *, extra_eos_token_ids: Sequence[int] = ()
    ):
        self.hf = hf
        vocab = hf.get_vocab()
        special = set(hf.all_special_tokens)
        ids = {int(i) for i in extra_eos_token_ids}
        if hf.eos_token_id is not None:
            ids.add(int(hf.eos_token_id))
        ids.update(vocab[t] for t in _END_TOKENS if t in vocab and t in special)
        if not ids:
            raise ValueError(
                "The tokenizer has no EOS token and no known end-of-turn token; "
                "pass extra_eos_token_ids."
            )
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(ids))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Loads ``tokenizer.json`` & co. from a Hugging Face directory with ``AutoTokenizer``.

        EOS ids listed in the directory's ``generation_config.json`` count as ends of reply.
        """
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"Tokenizer directory not found: {directory}")
        try:
            hf = transformers.AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory}: cannot load a tokenizer ({e}).") from e
        if not isinstance(hf, transformers.PreTrainedTokenizerFast):
            raise ValueError(
                f"{directory}: expected a fast tokenizer (tokenizer.json), got {type(hf).__name__}."
            )
        extra: list[int] = []
        generation_config = directory / "generation_config.json"
        if generation_config.is_file():
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
            extra = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(hf, extra_eos_token_ids=extra)

    @classmethod
    def from_gguf(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> Tokenizer:
        """Builds the byte-level BPE tokenizer a GGUF file describes.

        Args:
          source: a ``.gguf`` path, or its decoded metadata
            (``fedsp.model.gguf.read_gguf_metadata`` / ``GGUFCheckpoint.metadata``).

        Raises:
          ValueError: the tokenizer is not byte-level BPE (``tokenizer.ggml.model`` other
            than ``gpt2``, e.g. sentencepiece ``llama``), its ``tokenizer.ggml.pre`` type is
            unknown, or a required key is missing.
        """
        if isinstance(source, Mapping):
            metadata, name = source, "GGUF metadata"
        else:
            metadata, name = read_gguf_metadata(source), str(source)
        return cls(
            _hf_from_gguf_metadata(metadata, name), extra_eos_token_ids=_gguf_eos_ids(metadata)
        )

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return len(self.hf)

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def pad_token_id(self) -> int:
        """The id padding positions hold (the tokenizer's pad token, else its first EOS id).

        Padding is always marked by the mask, so its value never reaches a loss.
        """
        pad = self.hf.pad_token_id
        return int(pad) if pad is not None else self.eos_token_ids[0]

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    # ------------------------------------------------------------------ text -> ids

    def apply_chat_template(
        self,
        conversations: str | Sequence[Message] | Sequence[str] | Sequence[Sequence[Message]],
        add_generation_prompt: bool = True,
    ) -> str | list[str]:
        """Formats prompts with the model's chat template.

        Args:
          conversations: one conversation (a prompt string, taken as a single user message,
            or a list of message dicts) or a batch of them (a list of prompt strings, or a
            list of message lists).
          add_generation_prompt: end with the header of an assistant turn, so generation
            continues as the assistant.

        Returns:
          The formatted string for one conversation; a list of strings for a batch.
        """
        if self.hf.chat_template is None:
            raise ValueError("This tokenizer has no chat template (tokenizer.chat_template).")
        single = isinstance(conversations, str) or (
            len(conversations) > 0 and isinstance(conversations[0], Mapping)
        )
        batch = [conversations] if single else list(conversations)
        formatted = []
        for conversation in batch:
            messages = (
                [{"role": "user", "content": conversation}]
                if isinstance(conversation, str)
                else conversation
            )
            if not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
                raise ValueError(
                    "conversations: expected a prompt string, a list of {'role', 'content'} "
                    "dicts, or a list of those."
                )
            checked = cast(Sequence[Mapping[str, str]], messages)  # validated just above
            text = self.hf.apply_chat_template(
                [dict(m) for m in checked],
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            formatted.append(cast(str, text))  # tokenize=False returns the text
        return formatted[0] if single else formatted

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of one string (chat-formatted text already holds its special tokens)."""
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        left_pad: bool = True,
        add_special_tokens: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes a batch into one padded ``[B, T]`` array.

        Args:
          texts: ``B`` strings.
          max_length: ``None`` pads to the longest row. An int fixes ``T = max_length``
            (a fixed shape, so a jit-compiled consumer does not recompile) and truncates
            longer rows, dropping their *first* tokens when ``left_pad`` (a generation
            prompt's end is what the model continues) and their last tokens otherwise.
          left_pad: padding before the tokens (for generation) or after them (training).
          add_special_tokens: let the tokenizer add BOS/EOS as its config says; chat-
            formatted text already contains them, so the default is False.

        Returns:
          ``(ids[B, T] int32, mask[B, T] int32)``; ``mask`` is 1 on real tokens and 0 on
          padding, which holds :attr:`pad_token_id`.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a sequence of strings.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length={max_length}; expected a positive int or None.")
        rows = self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        if max_length is not None:
            rows = [row[-max_length:] if left_pad else row[:max_length] for row in rows]
        width = max_length if max_length is not None else max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left_pad else slice(0, len(row))
            ids[i, span] = row
            mask[i, span] = 1
        return ids, mask

    # ------------------------------------------------------------------ ids -> text

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of a 1-D id sequence."""
        text = self.hf.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )
        return cast(str, text)  # one id sequence decodes to one string

    def batch_decode(
        self,
        ids: np.ndarray | Sequence[Sequence[int]],
        mask: np.ndarray | None = None,
        skip_special_tokens: bool = True,
    ) -> list[str]:
        """Texts of ``ids[B, T]``, keeping only positions where ``mask[B, T]`` is nonzero."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"ids: expected shape [B, T], got {ids.shape}.")
        if mask is not None and np.shape(mask) != ids.shape:
            raise ValueError(f"mask: expected shape {ids.shape} like ids, got {np.shape(mask)}.")
        keep = np.ones(ids.shape, bool) if mask is None else np.asarray(mask).astype(bool)
        return [
            self.decode(row[k], skip_special_tokens=skip_special_tokens)
            for row, k in zip(ids, keep, strict=True)
        ]

    # ------------------------------------------------------------------ export

    def save_pretrained(self, directory: str | os.PathLike[str]) -> list[str]:
        """Writes the Hugging Face tokenizer files (``tokenizer.json``, config, chat template)."""
        return list(self.hf.save_pretrained(str(directory)))

    def gguf_metadata(self) -> dict[str, Any]:
        """The ``tokenizer.*`` GGUF keys describing this tokenizer (byte-level BPE only).

        The inverse of :meth:`from_gguf`, for ``fedsp.model.gguf.save_gguf``.
        """
        state = json.loads(self.hf.backend_tokenizer.to_str())
        model = state["model"]
        if model.get("type") != "BPE" or not _is_byte_level(state):
            raise ValueError(
                "gguf_metadata: only byte-level BPE tokenizers can be written to GGUF."
            )
        added = {t["id"]: t for t in state.get("added_tokens", [])}
        size = max([*model["vocab"].values(), *added]) + 1
        tokens: list[str | None] = [None] * size
        types = [_NORMAL] * size
        for token, index in model["vocab"].items():
            tokens[index] = token
        for index, token in added.items():
            tokens[index] = token["content"]
            types[index] = _CONTROL if token["special"] else _USER_DEFINED
        if any(t is None for t in tokens):
            raise ValueError("gguf_metadata: the vocabulary has gaps in its ids.")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        metadata: dict[str, Any] = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": _pre_name(self.hf.backend_tokenizer),
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.add_bos_token": bool(getattr(self.hf, "add_bos_token", False)),
        }
        for name in ("bos", "eos", "unk", "pad"):
            token_id = getattr(self.hf, f"{name}_token_id")
            if token_id is not None:
                key = "unknown" if name == "unk" else "padding" if name == "pad" else name
                metadata[f"tokenizer.ggml.{key}_token_id"] = int(token_id)
        if self.hf.chat_template is not None:
            metadata["tokenizer.chat_template"] = self.hf.chat_template
        return metadata


def _hf_from_gguf_metadata(
    metadata: Mapping[str, Any], source: str
) -> transformers.PreTrainedTokenizerFast:
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"{source}: tokenizer.ggml.model={kind!r}; only byte-level BPE ('gpt2': Llama 3, "
            "Qwen2, SmolLM) can be built from GGUF metadata. Load the model's Hugging Face "
            "directory instead."
        )
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in metadata:
            raise ValueError(f"{source}: GGUF metadata has no {key!r}.")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TO_FAMILY:
        raise ValueError(
            f"{source}: unsupported tokenizer.ggml.pre={pre!r}; "
            f"supported: {sorted(_PRE_TO_FAMILY)}."
        )
    family = _PRE_TO_FAMILY[pre]
    tokens = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    bpe = models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=merges,
        fuse_unk=False,
        # Llama 3 looks a pre-token up whole before merging (tokenizer.json "ignore_merges").
        ignore_merges=family == "llama3",
    )
    backend = tokenizers.Tokenizer(bpe)
    if family == "qwen2":
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer(family)
    backend.decoder = decoders.ByteLevel()
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if len(token_types) != len(tokens):
        raise ValueError(
            f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for "
            f"{len(tokens)} tokens."
        )
    # llama.cpp matches control and user-defined tokens whole, before BPE.
    added = [
        (t, k) for t, k in zip(tokens, token_types, strict=True) if k in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_special_tokens(
        [
            tokenizers.AddedToken(t, special=True, normalized=False)
            for t, k in added
            if k == _CONTROL
        ]
    )
    backend.add_tokens(
        [
            tokenizers.AddedToken(t, special=False, normalized=False)
            for t, k in added
            if k != _CONTROL
        ]
    )

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def _gguf_eos_ids(metadata: Mapping[str, Any]) -> list[int]:
    keys = (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    )
    return [int(metadata[k]) for k in keys if metadata.get(k) is not None]


def _pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    if family == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if family == "digits":
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[family]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _is_byte_level(state: Mapping[str, Any]) -> bool:
    decoder = state.get("decoder") or {}
    return decoder.get("type") == "ByteLevel" or any(
        d.get("type") == "ByteLevel" for d in decoder.get("decoders", [])
    )


def _pre_name(backend: tokenizers.Tokenizer) -> str:
    """The GGUF ``tokenizer.ggml.pre`` name whose pre-tokenizer splits text like ``backend``."""

    def pieces(normalizer: Any, pre_tokenizer: Any) -> list[str]:
        text = normalizer.normalize_str(_PRE_PROBE) if normalizer is not None else _PRE_PROBE
        return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]

    if backend.pre_tokenizer is None:
        raise ValueError("gguf_metadata: the tokenizer has no pre-tokenizer.")
    actual = pieces(backend.normalizer, backend.pre_tokenizer)
    for family, names in _PRE_FAMILIES.items():
        normalizer = normalizers.NFC() if family == "qwen2" else None
        if pieces(normalizer, _pre_tokenizer(family)) == actual:
            return names[0]
    raise ValueError(
        "gguf_metadata: the pre-tokenizer matches none of the GGUF pre types fedsp writes "
        f"({[names[0] for names in _PRE_FAMILIES.values()]})."
    )
