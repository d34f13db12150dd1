"""AutoAWQ GEMM output (targets.md §2): `qweight`/`qzeros` packed along N in the AWQ nibble order,
dequantized as AutoAWQ's `dequantize_gemm` does: (u - z) * scale."""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert.errors import InputError
from ct_convert.readers.targets.base import HFOutputReader, quant_method, register

# column 8c + j of a word sits in nibble AWQ_REVERSE_ORDER[j]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> int64 [R, 8W] codes in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [R, W, 8], nibble order
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(words.shape[0], -1)


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
        s = self.store.get(f"{module}.scales").to(torch.float32)  # [G, N]
        k = u.shape[0]
        gs = int(qc.get("group_size", qc.get("q_group_size")))
        gs = k if gs == -1 else gs
        if s.shape[0] * gs != k or z.shape != s.shape:
            raise InputError(f"{module}: scales {list(s.shape)} / qzeros do not fit K={k} with group size {gs}")
        rows = torch.arange(k) // gs
        w = (u - z.index_select(0, rows)).to(torch.float32) * s.index_select(0, rows)
        return w.t().contiguous()


@register("awq")
class AWQKind:
    def detect(self, folder: Path) -> bool:
        return quant_method(folder) == "awq"

    def open(self, folder: Path) -> AWQOutput:
        return AWQOutput(folder)
