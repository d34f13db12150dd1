"""AutoAWQ GEMM output (targets.md §2): `qweight`/`qzeros` packed along N in the AWQ nibble order,
dequantized as AutoAWQ's `dequantize_gemm` does: (u - z) * scale."""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert.errors import InputError
from ct_convert.readers.targets.base import HFOutputReader, dequantize_groups, nibbles, quant_method, register

# column 8c + j of a word sits in nibble AWQ_REVERSE_ORDER[j]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> uint8 [R, 8W] codes in column order."""
    nib = nibbles(words)  # [R, W, 8] in nibble order
    order = torch.tensor(AWQ_REVERSE_ORDER, dtype=torch.int64)
    return nib.index_select(2, order).reshape(words.shape[0], -1)


class AWQOutput(HFOutputReader):
    kind = "awq"

    def dequantize_quantized(self, module: str) -> torch.Tensor | None:
        if f"{module}.qweight" not in self.store:
            return None
        qc = self.config["quantization_config"]
        if qc.get("bits", qc.get("w_bit")) != 4 or qc.get("version", "gemm").lower() != "gemm":
            raise InputError(f"{self.folder}: only 4-bit AWQ GEMM checkpoints can be read back")
        u = unpack_awq(self.store.get(f"{module}.qweight"))  # [K, N]
        z = unpack_awq(self.store.get(f"{module}.qzeros"))  # [G, N]
        s = self.store.get(f"{module}.scales")  # [G, N]
        k = u.shape[0]
        gs = int(qc.get("group_size", qc.get("q_group_size")))
        gs = k if gs == -1 else gs
        if s.shape[0] * gs != k or z.shape != s.shape:
            raise InputError(f"{module}: scales {list(s.shape)} / qzeros do not fit K={k} with group size {gs}")
        return dequantize_groups(u.t(), z.to(torch.int16), s)


@register("awq")
class AWQKind:
    def detect(self, folder: Path) -> bool:
        return quant_method(folder) == "awq"

    def open(self, folder: Path) -> AWQOutput:
        return AWQOutput(folder)
