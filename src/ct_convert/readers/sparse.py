"""Legacy bitmask sparsity (compressed-tensors <= 0.14, §5.10–§5.11), decoded at the tensor level.

`SparseStore` wraps a TensorStore and presents every bitmask-compressed tensor under the dense name
it replaced, so that module discovery and the quantization decoders never see the sparse layout:
- 0.9–0.14: `<module>.compressed/.bitmask/.shape[/.row_offsets]` stand for `<module>.weight`;
- <= 0.8:   `<tensor>.compressed/...` (any tensor, e.g. `model.norm.weight`) stand for `<tensor>`.
"""

from __future__ import annotations

import math

import torch

from ct_convert.errors import InputError
from ct_convert.tensorstore import TensorMeta, TensorStore

PARTS = ("compressed", "bitmask", "shape", "row_offsets")
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


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

    def total_bytes(self) -> int:
        return self.base.total_bytes()

    def close(self) -> None:
        self.base.close()

    def _dense_shape(self, prefix: str) -> tuple[int, ...]:
        if prefix not in self._shapes:
            raw = self.base.get(f"{prefix}.shape").reshape(-1)
            shape = tuple(int(d) for d in raw.tolist())
            if not shape or any(d < 0 for d in shape) or math.prod(shape) > 2**40:
                raise InputError(f"tensor {prefix}.shape: invalid dense shape {shape}")
            self._shapes[prefix] = shape
        return self._shapes[prefix]

    def _decode(self, prefix: str) -> torch.Tensor:
        shape = self._dense_shape(prefix)
        values = self.base.get(f"{prefix}.compressed").reshape(-1)
        bitmask = self.base.get(f"{prefix}.bitmask")
        cols = shape[-1] if shape else 1
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        row_bytes = math.ceil(cols / 8)
        if bitmask.dtype != torch.uint8 or bitmask.numel() != rows * row_bytes:
            raise InputError(
                f"tensor {prefix}.bitmask: expected {rows}x{row_bytes} uint8 bytes for dense shape {list(shape)}, "
                f"got {list(bitmask.shape)} {bitmask.dtype}"
            )
        bits = (bitmask.reshape(rows, row_bytes, 1) >> torch.arange(8, dtype=torch.uint8)) & 1
        mask = bits.reshape(rows, row_bytes * 8)[:, :cols].bool().reshape(-1)
        kept = int(mask.sum())
        if kept != values.numel():
            raise InputError(
                f"tensor {prefix}.compressed: holds {values.numel()} values but its bitmask keeps {kept}"
            )
        itemsize = values.element_size()
        as_int = _SAME_WIDTH_INT[itemsize]
        dense = torch.zeros(rows * cols, dtype=as_int)
        dense[mask] = values.view(as_int)
        return dense.view(values.dtype).reshape(shape)
