"""`--target awq`: the AutoAWQ GEMM layout (targets.md §2) that vLLM, SGLang, lmdeploy, TGI and
transformers load: int4 codes packed along N in the AWQ nibble order, unsigned zero points."""

from __future__ import annotations

import torch

from ct_convert.errors import UnsupportedConversion
from ct_convert.marlin_layout import INTERLEAVE, pack_lsb
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.safetensors_out import TensorSpec
from ct_convert.writers.base import RepackOptions, WriteReport, register
from ct_convert.writers.gptq import IntWeightWriter, fp16_scales, require_plain_g_idx, unsigned_codes, unsigned_zeros

AWQ_ORDER = INTERLEAVE[4]  # nibble i of a word holds column 8c + AWQ_ORDER[i]


def pack_awq(u: torch.Tensor) -> torch.Tensor:
    """uint8 codes [R, N] -> int32 [R, N/8], packed along N in AutoAWQ's nibble order."""
    r, n = u.shape
    order = torch.tensor(AWQ_ORDER, dtype=torch.int64, device=u.device)
    return pack_lsb(u.reshape(r, n // 8, 8).index_select(2, order).reshape(r, n), 4)


@register
class AWQWriter(IntWeightWriter):
    name = "awq"
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

    def check(self, reader, opts: RepackOptions) -> None:
        super().check(reader, opts)
        # loaders skip a module when any listed name is a substring of its name
        skipped = set(reader.unquantized)
        if opts.keep_unsupported:
            skipped |= {m for m, i in reader.modules.items() if self.refusal(i, opts)}
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
        return {
            "qweight": pack_awq(unsigned_codes(qw).t()),
            "qzeros": pack_awq(unsigned_zeros(qw)),
            "scales": fp16_scales(qw, self.label),
        }

    def quantization_config(self, reader, report: WriteReport, opts: RepackOptions) -> dict:
        return {
            "quant_method": "awq",
            "version": "gemm",
            "bits": 4,
            "group_size": self.config_group_size(reader, opts),
            "zero_point": True,
            "modules_to_not_convert": self.unconverted(reader, report),
        }
