"""GGUF output (gguf.md): read back with gguf-py's reader and dequantizers, mapped to HF names.

HF module -> GGUF tensor(s) as the architecture class says (architectures/: gguf-py's name map,
per-expert modules as slices of the stacked `*_exps` tensor, row orders such as llama's Q/K rope
order and splits undone by putting every stored row back where it came from, per-head 3-D parts
(MLA's attn_k_b, transposed, and attn_v_b) flattened back into rows first; a carried tensor whose
value llama.cpp changes, such as Gemma-3's 1 + w norms, is compared with that change applied to the
source, `as_stored`); NVFP4 is the block value times the `.scale` multiplier, as llama.cpp applies
it, rounded to bf16 (where it equals the source, gguf.md §0.1). A module split into parts of
different types (a quantized attn_v_b beside its dense attn_k_b fallback) reads back at the
precision of the coarser float type, as the fallback promises. The vision tower's mmproj file is
read by its class (architectures/vision.py): an F16 the converter forces read as float32 (compared
with the source exactly, never narrowed to F16), and rows it copies from a text tensor (Pixtral's
`[IMG_BREAK]` embedding) checked against that tensor.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import gguf
import numpy as np
import torch

from ct_convert import architectures, bitpack
from ct_convert.architectures import Part, vision
from ct_convert.bands import Bands
from ct_convert.errors import InputError
from ct_convert.targets.gguf.facts import MMPROJ_FILE, QUANTIZED, Q4_0_ZERO, block_bytes
from ct_convert.targets.reader_base import GroupCodes
from ct_convert.tensorstore import BAND_BYTES, band_rows

_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_ZERO_CODE = {"Q4_0": Q4_0_ZERO, "Q8_0": 128}  # integer blocks decoded to codes: the unsigned code of 0


def detect(folder: Path, config) -> bool:
    return any(folder.glob("*.gguf"))


def open(folder: Path, source_architecture: str | None = None) -> "GGUFOutput":
    return GGUFOutput(folder, source_architecture)


class GGUFOutput:
    working_bytes_per_weight = 12  # compared dequantized: float32 of both sides and the difference
    code_bytes_per_weight = 3  # compared as codes: the blocks' stream (Q8_0: codes) and scales, the source's

    def __init__(self, folder: Path, source_architecture: str | None = None):
        self.files = sorted(folder.glob("*.gguf"), key=lambda f: (f.name == MMPROJ_FILE, f.name))  # the text model first
        try:
            # copy-on-write mappings: torch can view them without a copy (a read-only mapping it
            # would have to copy or warn about), and nothing done to a view reaches the file
            self.readers = [gguf.GGUFReader(f, "c") for f in self.files]
        except (OSError, ValueError) as e:
            raise InputError(f"{folder}: unreadable GGUF ({e})") from None
        tower_reader = self.readers.pop() if self.files[-1].name == MMPROJ_FILE else None
        if not self.readers:
            raise InputError(f"{folder}: {MMPROJ_FILE} without the text model's GGUF")
        every = self.readers + ([tower_reader] if tower_reader else [])
        self.tensors = {t.name: t for r in every for t in r.tensors}  # v.* / mm.* never clash with text names
        # np.memmap keeps its mmap object private; without it pages are simply not released early
        self._maps = {t.name: getattr(r.data, "_mmap", None) for r in every for t in r.tensors}
        head = self.readers[0]
        arch = self._field(head, "general.architecture")
        # the source's class names its tensors, when it is one for this GGUF architecture (several
        # HF classes may share one); else the first registered for it
        cls = architectures.ARCHITECTURES.get(source_architecture)
        if cls is None or cls.gguf_arch_name() != arch:
            cls = architectures.for_gguf(arch)
        if cls is None:
            raise InputError(f"{folder}: GGUF architecture {arch!r} is not one ct-convert writes")
        self.model = cls.from_gguf(lambda key: self._field(head, key))
        self.tower = None if tower_reader is None else self._tower(folder, tower_reader, head)

    def _tower(self, folder: Path, r: gguf.GGUFReader, head: gguf.GGUFReader) -> vision.VisionTower:
        projector = self._field(r, "clip.projector_type")
        cls = vision.for_projector(projector) if self._field(r, "general.architecture") == "clip" else None
        if cls is None:
            raise InputError(f"{folder / MMPROJ_FILE}: not a vision projector ct-convert writes (projector {projector!r})")
        tokens = self._field(head, "tokenizer.ggml.tokens") or []
        try:
            return cls.from_gguf(lambda key: self._field(r, key), lambda text: tokens.index(text) if text in tokens else None)
        except InputError as e:
            raise InputError(f"{folder / MMPROJ_FILE}: {e}") from None

    def _in_tower(self, hf_name: str) -> bool:
        return self.tower is not None and vision.in_tower(self.model, type(self.tower), hf_name)

    @staticmethod
    def _field(reader: gguf.GGUFReader, key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    def omits(self, module: str) -> bool:
        """A source module the GGUF leaves out by design (a multi-token-prediction layer, a vision tower
        whose mmproj file was not written)."""
        return not self._in_tower(module) and self.model.is_dropped(f"{module}.weight")

    def _locate(self, hf_name: str) -> list[tuple[object, Part]] | None:
        """The stored tensor of every part of an HF tensor, or None if any is absent."""
        parts = (self.tower if self._in_tower(hf_name) else self.model).modify_tensors(hf_name)
        if not parts or any(p.name not in self.tensors for p in parts):
            return None
        return [(self.tensors[p.name], p) for p in parts]

    def _integer_blocks(self, module: str):
        """(tensor, part, type) where a module is stored as one Q4_0 / Q8_0 tensor, rows whole (what
        `decode` reads as codes); None where it is compared dequantized (a split, a per-head 3-D
        view, another type)."""
        located = self._locate(f"{module}.weight")
        if located is None or len(located) > 1:
            return None
        ((t, part),) = located
        qtype = _qtype(t)
        return (t, part, qtype) if part.heads is None and qtype in _ZERO_CODE else None

    def bytes_per_weight(self, module: str) -> int:
        return self.code_bytes_per_weight if self._integer_blocks(module) else self.working_bytes_per_weight

    def decode(self, module: str) -> GroupCodes | None:
        """Q4_0 / Q8_0 blocks as codes, the implicit zero point (8 / 128) and one fp16 scale per 32
        columns (gguf.md §2.1, §2.3): Q4_0 byte j holds element j (low nibble) and j + 16."""
        found = self._integer_blocks(module)
        if found is None:
            return None
        t, part, qtype = found
        expert = part.expert
        size, zero = block_bytes(qtype), _ZERO_CODE[qtype]
        raw = torch.from_numpy(t.data if expert is None else t.data[expert])  # [N, row bytes], still mapped
        n = raw.shape[0]
        blocks = _restore_rows([(part, raw.reshape(n, -1, size))])
        halves = blocks.view(torch.int16)  # [N, nb, size / 2]: the fp16 scale first (strided int16 copies are the fast ones)
        scales = halves[..., 0].contiguous().view(torch.float16).t()
        qs = blocks[..., 2:]

        def unpack() -> torch.Tensor:
            if qtype == "Q8_0":
                return (qs.contiguous().view(torch.int8) ^ -128).view(torch.uint8).reshape(n, -1)  # q + 128
            return torch.cat((qs & 0xF, qs >> 4), dim=-1).reshape(n, -1)

        stream = bitpack.by_rows(_q4_0_stream, halves[..., 1:]) if qtype == "Q4_0" else None
        self._release(t)  # the mapped pages are read; `unpack`, wanted only after a mismatch, maps them again
        return GroupCodes(unpack, zero, scales, stream=stream)

    def dequantize(self, module: str) -> torch.Tensor | None:
        return self.tensor(f"{module}.weight")

    def tensor(self, name: str) -> torch.Tensor | None:
        located = self._locate(name)
        if located is None:
            return None
        pieces = []
        for t, part in located:
            pieces.append((part, self._values(t, part.expert)))
            self._release(t)
        value = _restore_rows(pieces)
        if self._in_tower(name) and value.dtype == torch.float16:
            value = value.to(torch.float32)  # an F16 the converter forces: compared widened, not narrowed
        return value if self.tower is None else self._with_copies(name, value)

    def _with_copies(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """`value` with the rows an mmproj tensor copies from it put back from that copy (float32 where
        one differs, so that the comparison with the source sees it)."""
        for part in self.tower.copies(name):
            t = self.tensors.get(part.name)
            if t is None:
                continue
            rows = part.rows(value.shape[0])
            copy = self._values(t, None).reshape(len(rows), -1).to(torch.float32)
            if not torch.equal(copy, value[rows].to(torch.float32)):
                value = value.to(torch.float32)
                value[rows] = copy
        return value

    def as_stored(self, name: str, source: torch.Tensor) -> torch.Tensor:
        """A carried source tensor as this file must hold it, in the form `tensor(name)` returns: only
        the rows the architecture keeps (Gemma-3's real vocabulary), with the value llama.cpp stores
        (Gemma-3's norm + 1); `verify` compares this with what is read back."""
        if self._in_tower(name):
            return self.tower.stored_value(name, source)
        parts = self.model.modify_tensors(name) or []
        dim = -2 if source.dim() > 1 else 0
        kept = [p.rows(source.shape[dim]) for p in parts]
        if kept and all(k is not None for k in kept):
            rows = torch.unique(torch.cat(kept))
            if len(rows) < source.shape[dim]:
                source = source.index_select(dim, rows)
        return self.model.stored_value(name, source)

    def tensor_bands(self, name: str) -> "Bands | torch.Tensor | None":
        """`tensor`, a band of rows at a time where it is stored as one float tensor in the source's
        row order (an embedding): then `as_stored` is elementwise on it (verify applies it per band);
        else whole."""
        located = self._locate(name)
        if located is None:
            return None
        ((t, part), *more) = located
        qtype = _qtype(t)
        shape = _element_shape(t, None)
        whole = more or part.select is not None or part.expert is not None or part.heads is not None or part.transpose
        tower = self.tower is not None and (self._in_tower(name) or bool(self.tower.copies(name)))
        if whole or tower or qtype not in _FLOATS or len(shape) < 2:
            return self.tensor(name)  # rows moved, or read with the mmproj (F16 widened, rows it copies)
        data = t.data.reshape(shape[0], -1)
        step = band_rows(t.n_bytes, shape[0], BAND_BYTES)

        def produce():
            for r0 in range(0, shape[0], step):
                yield torch.from_numpy(data[r0:r0 + step]).view(_FLOATS[qtype]).reshape(-1, *shape[1:])
                self._release(t)  # the band is compared: its pages leave this process (a later read maps them again)

        return Bands(_FLOATS[qtype], shape, produce)

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
        if qtype.name in QUANTIZED:
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


def _qtype(t) -> str:
    return gguf.GGMLQuantizationType(t.tensor_type).name


def _q4_0_stream(qs: torch.Tensor) -> torch.Tensor:
    """Q4_0 quant bytes, read as int16 [N, nb, 8] (byte j: element j low, j + 16 high) -> each row's
    unsigned codes as an LSB-first 4-bit stream int32 [N, nb*4] (element 2i low in byte i), what
    verification compares with the source's packed words instead of unpacking both.

    Byte pair (2i, 2i + 1) is a 16-bit lane holding the nibbles of elements 2i, 2i + 16, 2i + 1,
    2i + 17: swapping the middle two makes it stream byte i (elements 2i, 2i + 1) then stream byte
    8 + i. Two byte swaps gather each int64's four low bytes before its four high ones, and one swap
    of 32-bit halves between a block's two int64s puts bytes 0..7 in the first and 8..15 in the second.
    """
    n, nb, _ = qs.shape
    x = torch.empty(qs.shape, dtype=qs.dtype).copy_(qs).view(torch.int64)  # [N, nb, 2], a copy to shuffle in place
    scratch = torch.empty_like(x)
    bitpack.shuffle(x, 4, 0x00F000F000F000F0, scratch)
    bitpack.shuffle(x, 8, 0x0000FF000000FF00, scratch)
    bitpack.shuffle(x, 16, 0x00000000FFFF0000, scratch)
    bitpack.exchange(x[..., 0], x[..., 1], 32, 0xFFFFFFFF, scratch)
    return x.view(torch.int32).view(n, nb * 4)


def _element_shape(t, expert: int | None) -> tuple[int, ...]:
    shape = tuple(int(x) for x in reversed(t.shape))  # ggml ne order -> numpy order
    return shape[1:] if expert is not None else shape


def _restore_rows(pieces: list[tuple[Part, torch.Tensor]]) -> torch.Tensor:
    """The source tensor from its stored parts (rows of values, or of whole blocks alike): each part,
    flattened back to rows, holds the source rows its `select` names, in that order; the source has
    all their rows. Parts in different types meet in the narrowest: quantized blocks read back as
    float32, a dense part's type is what its values were rounded to."""
    pieces = [(part, part.flatten(v)) for part, v in pieces]
    if len(pieces) == 1 and pieces[0][0].select is None:
        return pieces[0][1]
    n = sum(v.shape[0] for _, v in pieces)
    dtypes = {v.dtype for _, v in pieces}
    dtype = dtypes.pop() if len(dtypes) == 1 else min(dtypes - {torch.float32}, key=lambda d: d.itemsize, default=torch.float32)
    stored = torch.cat([v.to(dtype) for _, v in pieces]) if len(pieces) > 1 else pieces[0][1]
    rows = [part.rows(n) for part, _ in pieces]
    order = torch.cat([torch.arange(n) if r is None else r for r in rows])
    # stored row i is source row order[i]: gathering by the inverse permutation copies whole rows,
    # ten times quicker than scattering them by `order` (which indexes byte by byte)
    return stored.index_select(0, torch.argsort(order))
