"""Streaming safetensors output: the header is written from a plan, then tensors one at a time.

Shards are planned before any data is produced (every writer can say the dtype and shape of what it
will emit), so no shard is ever held in memory; a HashingSink writes and hashes in the background.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

from ct_convert.bands import Bands, pieces
from ct_convert.sink import HashingSink
from ct_convert.tensorstore import DTYPE_NAMES

T = TypeVar("T")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1000' -> 1000."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    # float() also reads "inf" and "nan", and "1e-9" would round down to no bytes at all
    if unit not in units or not math.isfinite(value) or value * units[unit] < 1:
        raise ValueError(f"invalid size {text!r} (examples: 5GB, 500MB, 2GiB)")
    return int(value * units[unit])


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def split_shards(items: list[T], max_bytes: int, nbytes: Callable[[T], int]) -> list[list[T]]:
    """Consecutive items into shards of at most `max_bytes` (an item larger than that alone in its shard)."""
    shards: list[list[T]] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


class SafetensorsFileWriter:
    """Writes one safetensors file whose tensors are known in advance, in the planned order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict | None = None):
        self.path = path
        self.specs = specs
        self._next = 0
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._sink = HashingSink.create(path)
        self._sink.write(len(raw).to_bytes(8, "little") + raw)

    @property
    def size(self) -> int:
        return self._sink.size

    def add(self, name: str, tensor: "torch.Tensor | Bands") -> None:
        """The next planned tensor, whole or as row bands (a large carried tensor)."""
        spec = self.specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"internal error: produced {name} {tensor.dtype} {list(tensor.shape)}, "
                f"planned {spec.name} {spec.dtype} {list(spec.shape)}"
            )
        rows = 0
        for band in pieces(tensor):
            if band.dtype != spec.dtype or tuple(band.shape[1:]) != spec.shape[1:]:
                raise RuntimeError(f"internal error: a band of {name} is {band.dtype} {list(band.shape)}, planned {list(spec.shape)}")
            self._sink.write(_bytes(band))
            rows += band.shape[0] if band.dim() else 1
        if rows != (spec.shape[0] if spec.shape else 1):
            raise RuntimeError(f"internal error: {name} got {rows} rows, planned {list(spec.shape)}")
        self._next += 1

    def add_stacked(self, name: str, slices: Iterable[torch.Tensor]) -> None:
        """A tensor planned as [E, ...] written one slice [...] at a time (stacked MoE experts), so the
        whole never exists in memory."""
        spec = self.specs[self._next]
        count = 0
        for t in slices:
            if name != spec.name or t.dtype != spec.dtype or tuple(t.shape) != tuple(spec.shape[1:]) or count == spec.shape[0]:
                raise RuntimeError(
                    f"internal error: produced slice {count} of {name} {t.dtype} {list(t.shape)}, "
                    f"planned {spec.name} {spec.dtype} {list(spec.shape)}"
                )
            self._sink.write(_bytes(t))
            count += 1
        if count != spec.shape[0]:
            raise RuntimeError(f"internal error: {name} got {count} of {spec.shape[0]} planned slices")
        self._next += 1

    def close(self) -> str:
        if self._next != len(self.specs):
            raise RuntimeError(f"internal error: {self.path.name} got {self._next} of {len(self.specs)} planned tensors")
        return self._sink.finish()[0]

    def abort(self) -> None:
        self._sink.abort()


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
