"""AutoAWQ GEMM output (targets.md §2): `qweight`/`qzeros` packed along N in the AWQ nibble order,
dequantized as AutoAWQ's `dequantize_gemm` does: (u - z) * scale."""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert.errors import InputError
from ct_convert.targets.awq.facts import QUANT_METHOD
from ct_convert.targets.reader_base import GroupCodes, HFOutputReader, quant_method


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> uint8 [R, 8W] codes in column order (a view of a contiguous [8W, R]).

    Column 8c + j sits in nibble (0, 4, 1, 5, 2, 6, 3, 7)[j] of word c: nibble p = 4m + i holds
    column 8c + 2i + m. Byte b = 2y + x of the word holds nibbles p = 2b (low) and 2b + 1 (high),
    so nibble `hi` of byte (y, x) is column 8c + 4x + 2hi + y. Words are transposed first: moving
    4-byte words costs far less than moving the 8 codes in them one byte at a time.
    """
    r, w = words.shape
    wt = torch.empty(w, r, dtype=torch.int32, device=words.device).copy_(words.t())  # fresh: viewable as bytes
    by = wt.view(torch.uint8).reshape(w, r, 2, 2).permute(0, 3, 2, 1)  # [c, x, y, R]
    out = torch.empty(w, 2, 2, 2, r, dtype=torch.uint8, device=words.device)  # [c, x, hi, y, R]
    torch.bitwise_and(by, 0xF, out=out[:, :, 0])
    torch.bitwise_right_shift(by, 4, out=out[:, :, 1])
    return out.reshape(8 * w, r).t()


class AWQOutput(HFOutputReader):
    working_bytes_per_weight = 4  # one byte per code on each side, then a few temporaries

    def decode(self, module: str) -> GroupCodes | None:
        if f"{module}.qweight" not in self.store:
            return None
        qc = self.config["quantization_config"]
        if qc.get("bits", qc.get("w_bit")) != 4 or qc.get("version", "gemm").lower() != "gemm":
            raise InputError(f"{self.folder}: only 4-bit AWQ GEMM checkpoints can be read back")
        qweight = self.store.get(f"{module}.qweight")  # [K, N/8]
        z = unpack_awq(self.store.get(f"{module}.qzeros"))  # [G, N]
        s = self.store.get(f"{module}.scales")  # [G, N]
        k = qweight.shape[0]
        gs = int(qc.get("group_size", qc.get("q_group_size")))
        gs = k if gs == -1 else gs
        if s.shape[0] * gs != k or z.shape != s.shape or 8 * qweight.shape[1] != s.shape[1]:
            raise InputError(f"{module}: scales {list(s.shape)} / qzeros do not fit qweight {list(qweight.shape)} with group size {gs}")
        return GroupCodes(lambda: unpack_awq(qweight).t(), z.to(torch.int16), s)


def detect(folder: Path, config) -> bool:
    return quant_method(config) == QUANT_METHOD


def open(folder: Path, source_architecture: str | None = None) -> AWQOutput:
    return AWQOutput(folder)
