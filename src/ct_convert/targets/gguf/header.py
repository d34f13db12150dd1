"""A bounded walk over a GGUF file's header (gguf.md §2) before gguf-py's reader sees it.

gguf-py trusts the counts a header states: a 100-byte file claiming 2^40 key-value pairs or an array
of 2^62 tokens ends in an IndexError or KeyError from deep inside the reader. Here every count is
checked against the bytes that remain before anything is read on its behalf, so such a file is
refused with one line naming it and the field.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import gguf

from ct_convert.errors import InputError

_V = gguf.GGUFValueType
_FIXED = {
    _V.UINT8: 1, _V.INT8: 1, _V.BOOL: 1, _V.UINT16: 2, _V.INT16: 2, _V.UINT32: 4, _V.INT32: 4,
    _V.FLOAT32: 4, _V.UINT64: 8, _V.INT64: 8, _V.FLOAT64: 8,
}  # fmt: skip
_U64 = struct.Struct("<Q")
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset
MAX_DIMS = 8
MAX_NESTING = 8


def check(path: Path) -> None:
    """Walk the key-value pairs and tensor infos; the data section (the weights) is never touched."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise InputError(f"{path}: not a GGUF file (empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _Walk(path, data).header()
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


class _Walk:
    def __init__(self, path: Path, data: mmap.mmap):
        self.path = path
        self.data = data
        self.pos = 0

    def refuse(self, what: str) -> InputError:
        return InputError(f"{self.path}: {what} (a {len(self.data)}-byte file)")

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.left():
            raise self.refuse(f"{field} runs past the end of the file")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, field: str) -> int:
        return struct.unpack("<I", self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return struct.unpack("<Q", self.take(8, field))[0]

    def string(self, field: str) -> bytes:
        n = self.u64(field)
        if n > self.left():
            raise self.refuse(f"{field} claims a {n}-byte string")
        return self.take(n, field)

    def strings(self, count: int, key: str) -> None:
        """An array of strings (a vocabulary: 10^5 of them), walked without a call per string."""
        data, pos, end = self.data, self.pos, len(self.data)
        for _ in range(count):
            if pos + 8 > end:  # also after a string whose length ran past the end
                raise self.refuse(f"{key}: array of {count} strings runs past the end of the file")
            pos += 8 + _U64.unpack_from(data, pos)[0]
        if pos > end:
            raise self.refuse(f"{key}: array of {count} strings runs past the end of the file")
        self.pos = pos

    def header(self) -> None:
        if self.take(4, "magic") != b"GGUF":
            raise self.refuse("not a GGUF file (no GGUF magic)")
        version = self.u32("version")
        if version not in (2, 3):
            raise self.refuse(f"GGUF version {version}, expected 2 or 3")
        n_tensors = self.u64("tensor_count")
        n_kv = self.u64("metadata_kv_count")
        if n_kv * MIN_KV_BYTES > self.left():
            raise self.refuse(f"metadata_kv_count claims {n_kv} key-value pairs, more than the file can hold")
        if n_tensors * MIN_TENSOR_INFO_BYTES > self.left():
            raise self.refuse(f"tensor_count claims {n_tensors} tensors, more than the file can hold")
        for i in range(n_kv):
            key = self.string(f"key of metadata pair {i}").decode("utf-8", "replace")
            self.value(self.u32(f"{key}: value type"), key, 0)
        for i in range(n_tensors):
            name = self.string(f"name of tensor {i}").decode("utf-8", "replace")
            dims = self.u32(f"tensor {name}: dimension count")
            if dims > MAX_DIMS:
                raise self.refuse(f"tensor {name}: {dims} dimensions")
            self.take(8 * dims + 4 + 8, f"tensor {name}: dimensions, type and offset")

    def value(self, vtype: int, key: str, depth: int) -> None:
        if vtype in _FIXED:
            self.take(_FIXED[vtype], key)
        elif vtype == _V.STRING:
            self.string(key)
        elif vtype == _V.ARRAY:
            if depth >= MAX_NESTING:
                raise self.refuse(f"{key}: arrays nested more than {MAX_NESTING} deep")
            item = self.u32(f"{key}: array element type")
            count = self.u64(f"{key}: array length")
            smallest = _FIXED.get(item, 8 if item == _V.STRING else 12)
            if count * smallest > self.left():
                raise self.refuse(f"{key}: array claims {count} elements, more than the file can hold")
            if item in _FIXED:
                self.take(count * _FIXED[item], key)
            elif item == _V.STRING:
                self.strings(count, key)
            else:
                for _ in range(count):
                    self.value(item, key, depth + 1)
        else:
            raise self.refuse(f"{key}: unknown value type {vtype}")
