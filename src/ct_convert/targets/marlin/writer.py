"""`--target marlin`: the original IST-DASLab Marlin checkpoint (targets.md §1.9) that TGI loads
(`--quantize marlin`): `B` in the Marlin tile layout, `s` permuted, 4-bit symmetric only."""

from __future__ import annotations

import torch

from ct_convert import bitpack
from ct_convert.errors import UnsupportedConversion
from ct_convert.marlin_layout import marlin_permute_scales, marlin_weights_from_stream
from ct_convert.plan import CONVERTED, Plan
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.safetensors_out import TensorSpec
from ct_convert.targets.int_writer import IntWeightWriter, fp16_scales, require_plain_g_idx, unsigned_codes
from ct_convert.targets.marlin.facts import QUANT_METHOD
from ct_convert.targets.writer_base import RepackOptions


class MarlinWriter(IntWeightWriter):
    label = "Marlin"
    bits = (4,)

    def layout_refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        s = info.scheme
        n, k = info.shape
        if not s.symmetric:
            return "asymmetric zero points; the Marlin format is symmetric only (use --target awq)"
        if s.strategy == "group" and s.group_size != 128:
            return f"group size {s.group_size}; the Marlin format runs group 128 or channel-wise only"
        if s.actorder == "group":
            return "act-order (g_idx) cannot be stored in the Marlin format (use --target gptq)"
        if k % 128 or n % 256:
            return f"shape N={n}, K={k}; the Marlin kernel needs K % 128 == 0 and N % 256 == 0"
        return None

    def data_check(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        return "its g_idx must be k // group_size (the Marlin format has no act-order)" if info.has_g_idx else None

    def check_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        super().check_plan(plan, reader, opts)
        refused = [(m, p.reason) for m, p in plan.modules.items() if p.status != CONVERTED]
        if refused:
            # no per-module exclusion list exists in this format, so a dense fallback would not load either
            name, why = refused[0]
            more = f" (and {len(refused) - 1} more modules)" if len(refused) > 1 else ""
            raise UnsupportedConversion(
                f"{name}: cannot be written as marlin: {why}{more}",
                hint="The Marlin format cannot mark modules unquantized (no --keep-unsupported dense); "
                "use --target gptq or --target awq.",
            )

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        n, k = info.shape
        return [
            TensorSpec("B", torch.int32, (k // 16, 2 * n)),
            TensorSpec("s", torch.float16, (info.num_groups, n)),
        ]

    def convert(self, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        require_plain_g_idx(qw, self.label)
        n, k = qw.shape
        scales = fp16_scales(qw, self.label)
        stream = qw.packed_stream  # pack-quantized sources store exactly the stream: no unpacking
        if stream is None:
            stream = bitpack.pack(unsigned_codes(qw), 4)
        return {
            "B": marlin_weights_from_stream(stream),
            "s": marlin_permute_scales(scales, k, n, qw.effective_group_size),
        }

    def quantization_config(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> dict:
        # TGI reads bits, group_size, sym and desc_act beside quant_method; vLLM <= 0.10 group_size and lm_head
        return {
            "quant_method": QUANT_METHOD,
            "group_size": self.config_group_size(plan, reader),
            "bits": 4,
            "sym": True,
            "desc_act": False,
            "lm_head": "lm_head" in plan.converted(),
        }


Writer = MarlinWriter
