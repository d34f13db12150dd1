"""GGUF output (gguf.md): read back with gguf-py's reader and dequantizers, mapped to HF names.

HF module -> GGUF tensor through gguf-py's name map (per-expert modules are slices of the stacked
`*_exps` tensor); the llama Q/K rope order is undone with the closed-form row index of gguf.md §3.4;
NVFP4 is the block value times the `.scale` multiplier, as llama.cpp applies it, rounded to bf16
(where it equals the source, gguf.md §0.1).
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from ct_convert.errors import InputError
from ct_convert.targets.reader_base import BAND_BYTES, GroupCodes

_EXPERT = re.compile(r"^(.+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")
_BLOCK_TYPES = {"Q4_0", "Q5_0", "Q8_0", "MXFP4", "NVFP4"}
_INT_BLOCKS = {"Q4_0": (18, 8), "Q8_0": (34, 128)}  # block bytes, the unsigned code of zero


def detect(folder: Path, config) -> bool:
    return any(folder.glob("*.gguf"))


def open(folder: Path) -> "GGUFOutput":
    return GGUFOutput(folder)


class GGUFOutput:
    working_bytes_per_weight = 12  # raw blocks, decoded codes and their temporaries, the source codes

    def __init__(self, folder: Path):
        self.files = sorted(folder.glob("*.gguf"))
        try:
            self.readers = [gguf.GGUFReader(f) for f in self.files]
        except (OSError, ValueError) as e:
            raise InputError(f"{folder}: unreadable GGUF ({e})") from None
        self.tensors = {t.name: t for r in self.readers for t in r.tensors}
        # np.memmap keeps its mmap object private; without it pages are simply not released early
        self._maps = {t.name: getattr(r.data, "_mmap", None) for r in self.readers for t in r.tensors}
        head = self.readers[0]
        self.arch = self._field(head, "general.architecture")
        arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.arch]
        self.n_head = int(self._field(head, f"{self.arch}.attention.head_count"))
        self.n_head_kv = int(self._field(head, f"{self.arch}.attention.head_count_kv") or self.n_head)
        self.names = gguf.get_tensor_name_map(arch_enum, int(self._field(head, f"{self.arch}.block_count")))

    @staticmethod
    def _field(reader: gguf.GGUFReader, key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    def _locate(self, hf_name: str):
        m = _EXPERT.match(hf_name)
        stacked = f"{m[1]}.{m[3]}.weight" if m else hf_name
        name = self.names.get_name(stacked, try_suffixes=(".weight", ".bias"))
        if name is None or name not in self.tensors:
            return None, None
        return self.tensors[name], (int(m[2]) if m else None)

    def decode(self, module: str) -> GroupCodes | None:
        """Q4_0 / Q8_0 blocks as codes, the implicit zero point (8 / 128) and one fp16 scale per 32
        columns (gguf.md §2.1, §2.3): Q4_0 byte j holds element j (low nibble) and j + 16."""
        t, expert = self._locate(f"{module}.weight")
        if t is None:
            return None
        qtype = gguf.GGMLQuantizationType(t.tensor_type).name
        if qtype not in _INT_BLOCKS:
            return None
        size, zero = _INT_BLOCKS[qtype]
        raw = torch.from_numpy(self._copy(t, t.data if expert is None else t.data[expert]))  # [N, row bytes]
        n = raw.shape[0]
        blocks = self._rope_order(t, raw.reshape(n, -1, size))
        scales = blocks[..., :2].contiguous().view(torch.float16).reshape(n, -1).t()
        qs = blocks[..., 2:]

        def unpack() -> torch.Tensor:
            if qtype == "Q8_0":
                return (qs.contiguous().view(torch.int8) ^ -128).view(torch.uint8).reshape(n, -1)  # q + 128
            return torch.cat((qs & 0xF, qs >> 4), dim=-1).reshape(n, -1)

        return GroupCodes(unpack, torch.full(scales.shape, zero, dtype=torch.int16), scales)

    def dequantize(self, module: str) -> torch.Tensor | None:
        return self.tensor(f"{module}.weight")

    def tensor(self, name: str) -> torch.Tensor | None:
        t, expert = self._locate(name)
        if t is None:
            return None
        value = self._values(t, expert)
        self._release(t)
        return self._rope_order(t, value)

    def _rope_order(self, t, rows: torch.Tensor) -> torch.Tensor:
        """Undo llama's Q/K row permutation (rows of values or of whole blocks alike)."""
        heads = {"attn_q": self.n_head, "attn_k": self.n_head_kv}.get(t.name.split(".")[2] if t.name.startswith("blk.") else "")
        if self.arch == "llama" and heads:
            return _unpermute(rows, heads)
        return rows

    def _release(self, t) -> None:
        """Unmap the pages a tensor was read from (the page cache keeps them): without this, every
        page of the memory-mapped file stays resident and the process grows to the file's size."""
        if not hasattr(mmap, "MADV_DONTNEED") or self._maps[t.name] is None:
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        self._maps[t.name].madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)

    def _copy(self, t, data: np.ndarray) -> np.ndarray:
        """A writable copy of a memory-mapped tensor, made a band at a time with the mapped pages
        released after each band, so the copy and the mapping are never both resident."""
        out = np.empty(data.shape, dtype=data.dtype)
        src, dst = data.reshape(-1), out.reshape(-1)
        step = max(1, BAND_BYTES // max(1, data.itemsize))
        for i in range(0, src.size, step):
            dst[i:i + step] = src[i:i + step]
            self._release(t)
        return out

    def _values(self, t, expert: int | None) -> torch.Tensor:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        data = t.data if expert is None else t.data[expert]
        if qtype.name in _BLOCK_TYPES:
            value = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype)))
            if qtype.name == "NVFP4":
                scale = self.tensors[t.name.removesuffix(".weight") + ".scale"].data
                factor = float(scale[expert if expert is not None else 0])
                value = (value * torch.tensor(factor, dtype=torch.float32)).to(torch.bfloat16)
            return value
        if qtype.name == "BF16":
            raw = self._copy(t, data).view(np.int16)
            return torch.from_numpy(raw).view(torch.bfloat16).reshape(_element_shape(t, expert))
        if qtype.name in ("F16", "F32"):
            return torch.from_numpy(self._copy(t, data)).reshape(_element_shape(t, expert))
        raise InputError(f"{t.name}: GGUF type {qtype.name} is not one ct-convert writes")


def _element_shape(t, expert: int | None) -> tuple[int, ...]:
    shape = tuple(int(x) for x in reversed(t.shape))  # ggml ne order -> numpy order
    return shape[1:] if expert is not None else shape


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Stored row r = h·hd + 2i + j holds HF row h·hd + j·hd/2 + i; put every row back."""
    n = w.shape[0]
    hd = n // n_head
    r = torch.arange(n)
    within = r % hd
    source = (r // hd) * hd + (within % 2) * (hd // 2) + within // 2
    out = torch.empty_like(w)
    out[source] = w
    return out
