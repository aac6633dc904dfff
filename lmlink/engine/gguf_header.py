"""Read a GGUF file's header: the tensor names, shapes and ggml types, without the data.

`mx.load` reads the tensors but says nothing about their original types, and it silently
dequantizes some types (correctly or not, see `gguf.py`). This reads just enough of the
header (skipping the metadata values, vocabularies included) to decide before loading.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# ggml's type ids (ggml.h, `enum ggml_type`); names as llama.cpp prints them.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# Fixed sizes of the metadata value types (8 = string and 9 = array are variable).
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest-varying dimension first
    type_name: str


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", _read(f, 4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFFormatError("the file ends inside its header (truncated download?)")
    return data


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _VALUE_SIZES:
        f.seek(_VALUE_SIZES[vtype], 1)
    elif vtype == 8:
        f.seek(_u64(f), 1)
    elif vtype == 9:
        etype, count = _u32(f), _u64(f)
        if etype in _VALUE_SIZES:
            f.seek(_VALUE_SIZES[etype] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    else:
        raise GGUFFormatError(f"unknown metadata value type {vtype}")


def read_tensor_infos(path: str | Path) -> list[TensorInfo]:
    """The tensors a GGUF file holds (name, shape, ggml type name), read from its header."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFFormatError(f"{path} is not a GGUF file (bad magic)")
        version = _u32(f)
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = _u64(f), _u64(f)
        for _ in range(n_kv):
            f.seek(_u64(f), 1)  # key
            _skip_value(f, _u32(f))
        tensors = []
        for _ in range(n_tensors):
            name = _read(f, _u64(f)).decode("utf-8", "replace")
            dims = tuple(_u64(f) for _ in range(_u32(f)))
            type_id = _u32(f)
            _u64(f)  # data offset
            tensors.append(TensorInfo(name, dims, GGML_TYPES.get(type_id, f"type {type_id}")))
    return tensors
