"""A GGUF file's header (metadata, tensor table) and its tensors as float32 arrays.

A small reader of the binary layout (v2/v3, little-endian) over a memory map; the
quantized blocks are decoded by the ``gguf`` package (``gguf.quants.dequantize``).
``fedsp.model.gguf`` maps the result onto Hugging Face names and configs.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import struct
from typing import Any

import gguf
import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF tensor table, located in the file."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: GGUF's ne reversed, so a Linear weight is (out, in)
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Truncated(Exception):
    pass


# GGUF scalar value types (gguf.GGUFValueType) -> struct format.
_SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Sequential little-endian reads from a byte buffer; reading past its end raises."""

    def __init__(self, buffer: Any):
        self.buffer, self.pos = buffer, 0

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buffer):
            raise _Truncated
        values = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += size
        return values

    def string(self) -> str:
        (length,) = self.unpack("Q")
        if self.pos + length > len(self.buffer):
            raise _Truncated
        text = bytes(self.buffer[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.unpack("IQ")
            if item_type in _SCALAR_FORMATS:
                return list(self.unpack(f"{count}{_SCALAR_FORMATS[item_type]}"))
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF value type {value_type}")
        return self.unpack(_SCALAR_FORMATS[value_type])[0]


def read_header(path: pathlib.Path) -> tuple[np.ndarray, list[TensorInfo], dict[str, Any]]:
    """Parses a GGUF (v2/v3, little-endian) header: the file, its tensor table, its metadata.

    Our own parser rather than ``gguf.GGUFReader``, which builds a numpy view per
    metadata part and is slow on a large vocabulary's token list.
    """
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    blob = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    cursor = _Cursor(blob)
    try:
        magic, version, tensor_count, kv_count = cursor.unpack("4sIQQ")
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF').")
        if version not in (2, 3):
            raise ValueError(
                f"{path}: GGUF version {version} is not supported (expected 2 or 3, little-endian)."
            )
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            (value_type,) = cursor.unpack("I")
            metadata[key] = cursor.value(value_type)
        table = []
        for _ in range(tensor_count):
            name = cursor.string()
            (n_dims,) = cursor.unpack("I")
            dims = cursor.unpack(f"{n_dims}Q")
            raw_type, offset = cursor.unpack("IQ")
            table.append((name, dims, raw_type, offset))
    except _Truncated:
        raise ValueError(
            f"{path}: truncated: the header ends past the end of the file ({size} bytes)."
        ) from None
    alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = []
    for name, dims, raw_type, offset in table:
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {raw_type}.") from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        count = math.prod(dims)
        info = TensorInfo(
            name,
            ggml_type,
            tuple(reversed(dims)),
            data_start + offset,
            count // block_size * type_size,
        )
        if info.offset + info.nbytes > size:
            raise ValueError(
                f"{path}: truncated: tensor {name!r} ends past the end of the file ({size} bytes)."
            )
        tensors.append(info)
    return blob, tensors, metadata


def dequantize(path: pathlib.Path, blob: np.ndarray, tensor: TensorInfo) -> np.ndarray:
    """``tensor``'s values from the mapped file ``blob`` as float32 (``path`` names errors)."""
    raw = blob[tensor.offset : tensor.offset + tensor.nbytes]
    if tensor.ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if tensor.ggml_type == gguf.GGMLQuantizationType.F32 else np.float16
        return (
            raw.view(dtype).reshape(tensor.shape).astype(np.float32)
        )  # astype copies off the file
    try:
        byte_shape = gguf.quant_shape_to_byte_shape(tensor.shape, tensor.ggml_type)
        return np.asarray(
            gguf.quants.dequantize(raw.reshape(byte_shape), tensor.ggml_type), np.float32
        )
    except (NotImplementedError, ValueError) as e:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has quantization type {tensor.ggml_type.name}, "
            "which gguf.quants cannot dequantize."
        ) from e
