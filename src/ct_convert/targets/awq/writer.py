"""`--target awq`: the AutoAWQ GEMM layout (targets.md §2) that vLLM, SGLang, lmdeploy, TGI and
transformers load: int4 codes packed along N in the AWQ nibble order, unsigned zero points."""

from __future__ import annotations

import sys

import torch

from ct_convert import bitpack
from ct_convert.errors import UnsupportedConversion
from ct_convert.plan import CONVERTED, Plan
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.safetensors_out import TensorSpec
from ct_convert.targets.awq.facts import NIBBLE_ORDER, QUANT_METHOD
from ct_convert.targets.int_writer import IntWeightWriter, fp16_scales, require_plain_g_idx, unsigned_codes, unsigned_zeros
from ct_convert.targets.writer_base import RepackOptions

AWQ_ORDER = NIBBLE_ORDER
# pack_awq's word arithmetic is this order, read from little-endian int64 views of the codes
if tuple(AWQ_ORDER) != (0, 2, 4, 6, 1, 3, 5, 7) or sys.byteorder != "little":
    raise ImportError("ct_convert.targets.awq.writer needs a little-endian host and AutoAWQ's nibble order")


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, N] (any strides) -> int32 [R, N/8], packed along N in AutoAWQ's nibble order.

    AWQ_ORDER puts the even columns of each group of 8 in nibbles 0-3 and the odd ones in 4-7. With
    the 8 codes of a group read as one little-endian int64 (one code per byte), both halves are
    gathered by shifts and masks on whole words instead of a per-byte shuffle.
    """
    r, n = u.shape
    x = u.contiguous().reshape(-1).view(torch.int64).reshape(r, n // 8)

    def four_nibbles(fields):  # 4-bit fields at bits 0, 16, 32, 48 -> bits 0, 4, 8, 12
        fields = (fields | (fields >> 12)) & 0x000000FF000000FF
        return (fields | (fields >> 24)) & 0xFFFF

    even = four_nibbles(x & 0x000F000F000F000F)
    odd = four_nibbles((x >> 8) & 0x000F000F000F000F)
    return bitpack.to_int32(even | (odd << 16))


def transpose_awq(words: torch.Tensor) -> torch.Tensor:
    """compressed-tensors 4-bit words [N, K/8] (packed along K) -> AWQ qweight [K, N/8] (along N).

    Each 8 rows x 1 word block is an 8x8 nibble matrix; three rounds of masked delta swaps transpose
    it inside the words, with the rows taken in AWQ_ORDER so the interleave comes for free. The codes
    are never unpacked: both layouts hold the same unsigned nibbles. Done ~2 MiB of words at a time so
    that the swaps run in cache; each band is gathered as 8 contiguous planes [N/8, band] (the swaps
    then run on contiguous memory, not rows strided 8 words apart) and each plane lands transposed in
    its rows of the output, one copy in and one out.
    """
    n, kw = words.shape
    blocks = words.view(n // 8, 8, kw)
    out = torch.empty(kw, 8, n // 8, dtype=torch.int32, device=words.device)
    step = min(kw, max(1, 4 * bitpack.BAND_BYTES // max(1, n * words.element_size())))
    planes = torch.empty(8, n // 8, step, dtype=torch.int32, device=words.device)
    for c in range(0, kw, step):
        width = min(step, kw - c)
        rows = [planes[r, :, :width] for r in range(8)]
        for r, source_row in enumerate(AWQ_ORDER):
            rows[r].copy_(blocks[:, source_row, c:c + width])
        for s, shift, mask in ((4, 16, 0x0000FFFF), (2, 8, 0x00FF00FF), (1, 4, 0x0F0F0F0F)):
            for r in range(8):
                if r & s:
                    continue
                t = ((rows[r] >> shift) ^ rows[r + s]) & mask  # arithmetic-shift sign bits fall outside the mask
                rows[r + s] ^= t
                rows[r] ^= t << shift
        for r in range(8):
            out[c:c + width, r, :] = rows[r].t()
    return out.reshape(kw * 8, n // 8)


class AWQWriter(IntWeightWriter):
    label = "AWQ"
    bits = (4,)

    def layout_refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        s = info.scheme
        n, k = info.shape
        if s.strategy != "group":
            # gs = -1 is not read the same way by every AWQ loader, and K differs between modules
            return f"{s.strategy}-wise scales; AWQ needs a positive group size (use --target gptq, group_size -1)"
        if s.actorder == "group":
            return "act-order (g_idx) cannot be stored in AWQ (use --target gptq)"
        if k % s.group_size:
            return f"K={k} is not a multiple of the group size {s.group_size}"
        if n % 8:
            return f"N={n} is not a multiple of 8"
        return None

    def data_check(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        return "its g_idx must be k // group_size (AWQ has no act-order)" if info.has_g_idx else None

    def check_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        super().check_plan(plan, reader, opts)
        # loaders skip a module when any listed name is a substring of its name
        skipped = set(reader.unquantized)
        if opts.keep_unsupported:
            skipped |= {m for m, p in plan.modules.items() if p.status != CONVERTED}
        kept = [m for m in reader.modules if m not in skipped]
        for s in sorted(skipped):
            hit = next((m for m in kept if s in m), None)
            if hit:
                raise UnsupportedConversion(
                    f"{hit}: modules_to_not_convert would list {s}, and AWQ loaders would then skip {hit} too",
                    hint="Convert to --target gptq, or keep the checkpoint in compressed-tensors.",
                )

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        n, k = info.shape
        g = info.num_groups
        return [
            TensorSpec("qweight", torch.int32, (k, n // 8)),
            TensorSpec("qzeros", torch.int32, (g, n // 8)),
            TensorSpec("scales", torch.float16, (g, n)),
        ]

    def convert(self, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        require_plain_g_idx(qw, self.label)
        packed = qw.packed_stream
        n, k = qw.shape
        qweight = transpose_awq(packed) if packed is not None and k % 8 == 0 else pack_awq(unsigned_codes(qw).t())
        return {
            "qweight": qweight,
            "qzeros": pack_awq(unsigned_zeros(qw)),
            "scales": fp16_scales(qw, self.label),
        }

    def quantization_config(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> dict:
        return {
            "quant_method": QUANT_METHOD,
            "version": "gemm",
            "bits": 4,
            "group_size": self.config_group_size(plan, reader),
            "zero_point": True,
            "modules_to_not_convert": self.unconverted(plan, reader),
        }


Writer = AWQWriter
