"""Lazy, validated access to the tensors of one checkpoint, across any number of safetensors shards.

Headers are parsed and checked here before safetensors ever maps a file, so that a hostile or
truncated file fails with a message naming the file and the tensor instead of a low-level error.
Data is read lazily, one tensor at a time, with positioned reads into a fresh buffer rather than
through a memory map: a mapping keeps every page it touched resident (and counted against the
process), so converting a 1 TB checkpoint through mmap would look like 1 TB of RSS; reads leave those
pages to the kernel's page cache. Reading one module touches only its tensors.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from ct_convert import jsonfile
from ct_convert.errors import InputError
from ct_convert.regular_files import open_regular, open_regular_file

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
# Tensors in one checkpoint, all shards together: twice the largest published MoE checkpoints
# (Kimi-K2-class, 384 experts x 60 layers x 3 projections x 4 tensors, about 280k). A header at the
# 100 MB limit can describe over 10^6 tiny tensors, each costing per-tensor work in every phase.
MAX_TENSORS = 2**19
MAX_RANK = 8
# A tensor larger than this is read (and carried, cast, written, compared) as bands of whole rows of
# about this size, never whole: Llama-3's 128k-token embedding alone is 1 GB.
BAND_BYTES = 64 << 20

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]
    data_start: int = 0  # where the file's data section begins (8 + header length)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path, max_tensors: int = MAX_TENSORS) -> tuple[dict[str, TensorMeta], dict]:
    """Parse and validate one safetensors header: (tensors, __metadata__)."""
    tensors, metadata, _ = _read_header(path, max_tensors)
    return tensors, metadata


def _read_header(path: Path, max_tensors: int) -> tuple[dict[str, TensorMeta], dict, tuple]:
    """read_header, plus the file's identity. Parsing stops once the header has built more objects than
    `max_tensors` entries need (what is left of the checkpoint's MAX_TENSORS), so a header of 10^6 tiny
    tensors is refused after a bounded part of it was read."""
    try:
        with open_regular_file(path) as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise InputError(f"{path}: declared header size {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise InputError(f"{path}: truncated: header of {n} bytes runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    with jsonfile.gc_paused():
        tensors, metadata = _parse_header(path, raw, 8 + n, size - 8 - n, max_tensors)
    return tensors, metadata, _identity(st)


def _parse_header(path: Path, raw: bytes, data_start: int, data_len: int, max_tensors: int):
    too_many = InputError(
        f"{path}: the header describes more tensors than the {MAX_TENSORS} ct-convert reads in one checkpoint",
        hint="Real checkpoints, the largest MoE models included, hold far fewer; this file is not a model.",
    )
    # Every entry spells this key; elsewhere the token can only be a string value or the end of a
    # string after an escaped quote, neither of which a real header holds. Counting it refuses an
    # oversized header in milliseconds, where parsing up to the limit takes seconds; a header that
    # escapes the key's letters (data\u005foffsets) still stops at `max_objects` below.
    if raw.count(b'"data_offsets"') > max_tensors:
        raise too_many
    try:
        # one object per tensor, plus the header itself and __metadata__
        header = jsonfile.parse(raw, f"{path}: corrupt safetensors header", max_objects=max_tensors + 2, check_depth=False)
    except jsonfile.TooManyObjects:
        raise too_many from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if len(header) > max_tensors:
        raise too_many
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ is not a JSON object of strings")
    for key, value in metadata.items():
        _check_text(path, f"__metadata__ key {key!r}", key)
        _check_text(path, f"__metadata__ value of {key!r}", value)
    tensors: dict[str, TensorMeta] = {}
    for name, entry in header.items():
        _check_text(path, f"tensor name {name!r}", name)
        tensors[name] = _check_entry(path, name, entry, data_len, data_start)
    # safetensors requires the tensors to tile the data section exactly, in offset order
    end = 0
    for (start, stop), name in sorted((m.offsets, name) for name, m in tensors.items()):
        if start < end:
            raise InputError(f"{path}: tensor {name!r} overlaps the tensor before it in the data section")
        if start > end:
            raise InputError(f"{path}: tensor {name!r} starts at byte {start}, leaving a gap the header does not describe")
        end = stop
    if end != data_len:
        raise InputError(f"{path}: the header describes {end} bytes of data but the file holds {data_len}")
    return tensors, metadata


def _check_text(path: Path, what: str, text: str) -> None:
    """JSON can spell a lone UTF-16 surrogate (\\ud800) that no UTF-8 file name or tensor name can hold;
    safetensors refuses such headers, and so does this reader."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{path}: {what} is not valid Unicode (a lone UTF-16 surrogate)") from None


def _check_entry(path: Path, name: str, entry, data_len: int, data_start: int) -> TensorMeta:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: header entry is not an object")
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise InputError(f"{where}: unsupported dtype {_short(dtype)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not _valid_shape(shape):
        raise InputError(f"{where}: invalid shape {_short(shape)}")
    offs = entry.get("data_offsets")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise InputError(f"{where}: invalid data_offsets {_short(offs)}")
    if offs[1] > data_len:
        raise InputError(f"{where}: data_offsets {offs} run past the end of the file (truncated?)")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if offs[1] - offs[0] != expected:
        raise InputError(
            f"{where}: {offs[1] - offs[0]} bytes stored but dtype {dtype} with shape {shape} needs {expected}"
        )
    return TensorMeta(path, dtype, tuple(shape), (offs[0], offs[1]), data_start)


def _valid_shape(shape: list) -> bool:
    """Non-negative integer dimensions whose running product stays inside int64, as safetensors
    (checked multiplication) and torch require: [2**64, 0] holds no bytes but no tensor can have it."""
    if len(shape) > MAX_RANK:
        return False
    elements = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d < 2**63:
            return False
        elements *= d
        if elements >= 2**63:
            return False
    return True


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class HeaderIndex:
    """Tensor headers by name: what every store answers without reading data."""

    _meta: dict[str, TensorMeta]

    @property
    def names(self) -> list[str]:
        return sorted(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise InputError(f"missing tensor {name!r}") from None

    def total_bytes(self) -> int:
        return sum(m.nbytes for m in self._meta.values())


class TensorStore(HeaderIndex):
    """Every tensor of a checkpoint, by name, across shards; reads are lazy positioned reads.

    Each read opens its shard and closes it again: a source of thousands of shards never holds more
    descriptors than there are reads in flight (an open costs microseconds; a tensor read, far more).
    """

    def __init__(self, root: Path, files: list[Path], weight_map: dict[str, Path] | None = None):
        self.root = root
        self.files = files
        self.metadata: dict[Path, dict] = {}
        self._meta: dict[str, TensorMeta] = {}
        self._identity: dict[Path, tuple] = {}
        for file in files:
            tensors, md, self._identity[file] = _read_header(file, MAX_TENSORS - len(self._meta))
            self.metadata[file] = md
            for name, meta in tensors.items():
                if name in self._meta:
                    raise InputError(
                        f"tensor {name!r} is stored twice: in {self._meta[name].file.name} and {file.name}",
                        hint="A checkpoint must hold each tensor once; remove the stale shard.",
                    )
                self._meta[name] = meta
        if weight_map is not None:
            for name, file in weight_map.items():
                meta = self._meta.get(name)
                if meta is None:
                    raise InputError(f"{file}: missing tensor {name!r} that the index lists")
                if meta.file != file:
                    raise InputError(f"tensor {name!r}: the index says {file.name} but it is in {meta.file.name}")

    def get(self, name: str) -> torch.Tensor:
        meta = self.meta(name)
        return self._read(name, meta, 0, meta.shape[0] if meta.shape else 1)

    def bands(self, name: str) -> Iterator[torch.Tensor]:
        """The tensor as consecutive bands of rows (dim 0) of about BAND_BYTES each; one band when
        it is smaller, or 0-D."""
        meta = self.meta(name)
        rows = meta.shape[0] if meta.shape else 1
        step = band_rows(meta.nbytes, rows, BAND_BYTES)
        for r0 in range(0, rows, step):
            yield self._read(name, meta, r0, min(rows, r0 + step))

    def _read(self, name: str, meta: TensorMeta, r0: int, r1: int) -> torch.Tensor:
        try:
            fd = open_regular(meta.file)
            try:
                if _identity(os.fstat(fd)) != self._identity[meta.file]:
                    raise InputError(f"{meta.file}: replaced or resized since its header was read")
                return read_tensor(fd, meta, r0, r1)
            finally:
                os.close(fd)
        except OSError as e:
            raise InputError(f"{meta.file}: cannot read tensor {name!r}: {e.strerror or e}") from None

    def close(self) -> None:
        """Nothing stays open between reads; kept for the stores that wrap this one."""


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def band_rows(nbytes: int, rows: int, band_bytes: int) -> int:
    """Rows per band for a tensor of `nbytes` in `rows` rows (at least one)."""
    return max(1, band_bytes // max(1, nbytes // max(1, rows)))


def read_tensor(fd: int, meta: TensorMeta, r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Read a tensor's bytes (rows r0..r1 of dim 0; all of a 0-D tensor) at its offset into a new
    buffer and view them with its dtype and shape."""
    rows = meta.shape[0] if meta.shape else 1
    r1 = rows if r1 is None else r1
    row_bytes = meta.nbytes // rows if rows else 0
    nbytes = (r1 - r0) * row_bytes
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    pos, start = 0, meta.data_start + meta.offsets[0] + r0 * row_bytes
    while pos < nbytes:
        got = os.preadv(fd, [view[pos:]], start + pos)
        if got == 0:
            raise InputError(f"{meta.file}: truncated while reading (the file shrank after it was opened)")
        pos += got
    shape = (r1 - r0, *meta.shape[1:]) if meta.shape else meta.shape
    return buf.view(DTYPES[meta.dtype][0]).reshape(shape)


def inside(root: Path, candidate: Path) -> bool:
    """True when `candidate` (after resolving symlinks) lies inside `root`."""
    try:
        return os.path.commonpath([root.resolve(), candidate.resolve()]) == str(root.resolve())
    except ValueError:
        return False
