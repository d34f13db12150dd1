"""Legacy bitmask sparsity (compressed-tensors <= 0.14, §5.10–§5.11), decoded at the tensor level.

`SparseStore` wraps a TensorStore and presents every bitmask-compressed tensor under the dense name
it replaced, so that module discovery and the quantization decoders never see the sparse layout:
- 0.9–0.14: `<module>.compressed/.bitmask/.shape[/.row_offsets]` stand for `<module>.weight`;
- <= 0.8:   `<tensor>.compressed/...` (any tensor, e.g. `model.norm.weight`) stand for `<tensor>`.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from ct_convert import memory
from ct_convert.errors import InputError
from ct_convert.tensorstore import MAX_RANK, TensorMeta, TensorStore

PARTS = ("compressed", "bitmask", "shape", "row_offsets")
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
BAND_ELEMENTS = 1 << 23  # dense elements expanded at a time: ~10 bytes of temporaries each
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


class SparseStore:
    def __init__(self, base: TensorStore):
        self.base = base
        self.root = base.root
        self.files = base.files
        self.metadata = base.metadata
        self._sparse: dict[str, str] = {}  # dense name -> prefix of its parts
        hidden: set[str] = set()
        for name in base.names:
            if not name.endswith(".bitmask"):
                continue
            prefix = name[: -len(".bitmask")]
            if f"{prefix}.compressed" not in base or f"{prefix}.shape" not in base:
                continue
            last = prefix.rsplit(".", 1)[-1]
            dense = prefix if last in ("weight", "bias") else f"{prefix}.weight"
            self._sparse[dense] = prefix
            hidden.update(f"{prefix}.{p}" for p in PARTS)
        self._nameset = (set(base.names) - hidden) | set(self._sparse)
        self._names = sorted(self._nameset)
        self._shapes: dict[str, tuple[int, ...]] = {}

    @property
    def names(self) -> list[str]:
        return self._names

    def __contains__(self, name: str) -> bool:
        return name in self._nameset

    def sparse_structure(self, name: str) -> str | None:
        """'2:4' or 'unstructured' for a tensor stored bitmask-compressed, else None."""
        prefix = self._sparse.get(name)
        if prefix is None:
            return None
        return "2:4" if len(self.base.meta(f"{prefix}.shape").shape) == 2 else "unstructured"

    def meta(self, name: str) -> TensorMeta:
        prefix = self._sparse.get(name)
        if prefix is None:
            return self.base.meta(name)
        comp = self.base.meta(f"{prefix}.compressed")
        return TensorMeta(comp.file, comp.dtype, self._dense_shape(prefix), comp.offsets)

    def get(self, name: str) -> torch.Tensor:
        prefix = self._sparse.get(name)
        if prefix is None:
            return self.base.get(name)
        return self._decode(prefix)

    def bands(self, name: str) -> Iterator[torch.Tensor]:
        """Row bands of a tensor (tensorstore's `bands`); a bitmask-compressed one is expanded whole
        first (its expansion is bounded by the memory left) and handed out as one band."""
        if name in self._sparse:
            yield self.get(name)
        else:
            yield from self.base.bands(name)

    def total_bytes(self) -> int:
        return self.base.total_bytes()

    def close(self) -> None:
        self.base.close()

    def _dense_shape(self, prefix: str) -> tuple[int, ...]:
        if prefix not in self._shapes:
            name = f"{prefix}.shape"
            if self.base.meta(name).numel > MAX_RANK:
                raise InputError(f"tensor {name}: {self.base.meta(name).numel} dimensions, expected at most {MAX_RANK}")
            shape = tuple(int(d) for d in self.base.get(name).reshape(-1).tolist())
            if not shape or any(d < 0 for d in shape) or math.prod(shape) > 2**40:
                raise InputError(f"tensor {name}: invalid dense shape {shape}")
            self._shapes[prefix] = shape
        return self._shapes[prefix]

    def _decode(self, prefix: str) -> torch.Tensor:
        """Expand one bitmask-compressed tensor. The dense size comes from `.shape`, a claim, so it is
        checked against the bitmask's size, the bitmask's population against the stored values, and
        the result against the memory left, all before the dense tensor exists; the expansion then
        runs in bands of rows, so its temporaries stay small whatever the module's size."""
        shape = self._dense_shape(prefix)
        values = self.base.meta(f"{prefix}.compressed")
        mask_meta = self.base.meta(f"{prefix}.bitmask")
        cols = shape[-1] if shape else 1
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        row_bytes = math.ceil(cols / 8)
        if mask_meta.dtype != "U8" or mask_meta.numel != rows * row_bytes:
            raise InputError(
                f"tensor {prefix}.bitmask: expected {rows}x{row_bytes} uint8 bytes for dense shape {list(shape)}, "
                f"got {list(mask_meta.shape)} {mask_meta.dtype}"
            )
        bitmask = self.base.get(f"{prefix}.bitmask").reshape(rows, row_bytes)
        kept = _population(bitmask, cols)
        if kept != values.numel:
            raise InputError(f"tensor {prefix}.compressed: holds {values.numel} values but its bitmask keeps {kept}")
        dense_bytes = rows * cols * values.torch_dtype.itemsize
        left = memory.available_bytes()
        if left is not None and dense_bytes > left:
            raise InputError(
                f"tensor {prefix}.bitmask: expands to a dense {list(shape)} {values.dtype} tensor of {dense_bytes} bytes, "
                f"more than the {left} bytes of memory left",
                hint="Convert on a machine with more memory, or check that the file is what it claims to be.",
            )
        stored = self.base.get(f"{prefix}.compressed").reshape(-1)
        as_int = _SAME_WIDTH_INT[stored.element_size()]
        stored = stored.view(as_int)
        dense = torch.zeros(rows * cols, dtype=as_int)
        step = max(1, BAND_ELEMENTS // max(1, cols))
        taken = 0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            mask = _unpack_rows(bitmask[r0:r1], cols).reshape(-1)
            n = int(mask.sum())
            dense[r0 * cols : r1 * cols][mask] = stored[taken : taken + n]
            taken += n
        return dense.view(values.torch_dtype).reshape(shape)


def _unpack_rows(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, ceil(cols/8)] bytes -> [rows, cols] bool; bit j of byte b is column 8b + j."""
    bits = (bitmask.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def _population(bitmask: torch.Tensor, cols: int) -> int:
    """Set bits among the first `cols` of every row (padding bits of a row's last byte are ignored,
    as the expansion ignores them), counted a band of rows at a time."""
    rows, row_bytes = bitmask.shape
    if row_bytes == 0:
        return 0
    pad_mask = (1 << (cols % 8)) - 1 if cols % 8 else 0xFF
    step = max(1, BAND_ELEMENTS // max(1, row_bytes * 8))
    total = 0
    for r0 in range(0, rows, step):
        band = bitmask[r0 : r0 + step].to(torch.int64)
        band[:, -1] &= pad_mask
        total += int(_POPCOUNT[band].sum())
    return total
