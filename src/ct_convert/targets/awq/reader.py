"""AutoAWQ GEMM output (targets.md §2): `qweight`/`qzeros` packed along N in the AWQ nibble order,
dequantized as AutoAWQ's `dequantize_gemm` does: (u - z) * scale."""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert import bitpack
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


def awq_stream(words: torch.Tensor) -> torch.Tensor:
    """qweight int32 [K, N/8] -> int32 [N, K/8]: each column's codes as an LSB-first 4-bit stream
    along K (code k in nibble k % 8 of word k // 8), what verification compares with the source's
    packed words instead of unpacking both. K must be a multiple of 8.

    Each 8 x 8 block of nibbles (rows 8w + i, word column c; nibble p = 4m + i' holds column
    8c + 2i' + m) is transposed across its 8 words in three delta-swap steps (4 x 4, 2 x 2, 1 x 1
    nibble blocks), which leaves in word p of the block the stream word w of column 8c + 2i' + m;
    one copy then puts the words in [column, word] order. Done for bands of word columns of ~512 KiB
    (at least 16 words: whole cache lines of each row), so that the swaps run in cache and each band
    fills whole rows of the result (a 29 MB weight on one core: 25-28 ms in bands of rows, 19 ms).
    """
    k, c = words.shape
    step = max(16, bitpack.BAND_BYTES // max(1, k * words.element_size()))
    out = torch.empty(8 * c, k // 8, dtype=torch.int32, device=words.device)
    for a in range(0, c, step):
        out[8 * a:8 * (a + step)] = _awq_stream(words[:, a:a + step])
    return out


def _awq_stream(words: torch.Tensor) -> torch.Tensor:
    """awq_stream of one band of word columns."""
    k, c = words.shape
    x = torch.empty(k // 8, 8, c, dtype=torch.int32, device=words.device)  # [w, i, c]; transposed in place
    x.copy_(words.reshape(k // 8, 8, c))
    out = torch.empty(c, 4, 2, k // 8, dtype=torch.int32, device=words.device)  # [c, i', m, w]; scratch until then
    for half, mask in ((4, 0x0000FFFF), (2, 0x00FF00FF), (1, 0x0F0F0F0F)):
        v = x.view(k // 8, 4 // half, 2, half, c)
        bitpack.exchange(v[:, :, 0], v[:, :, 1], 4 * half, mask, out)
    out.copy_(x.view(k // 8, 2, 4, c).permute(3, 2, 1, 0))
    return out.view(8 * c, k // 8)


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
        stream = awq_stream(qweight) if k % 8 == 0 else None
        return GroupCodes(lambda: unpack_awq(qweight).t(), z.to(torch.int16), s, stream=stream)


def detect(folder: Path, config) -> bool:
    return quant_method(config) == QUANT_METHOD


def open(folder: Path, source_architecture: str | None = None) -> AWQOutput:
    return AWQOutput(folder)
