"""`--target gptq`: the AutoGPTQ / GPTQModel checkpoint layout (targets.md §3), v1 or v2 zero points."""

from __future__ import annotations

import re

import torch

from ct_convert import bitpack
from ct_convert.errors import UnsupportedConversion
from ct_convert.marlin_layout import pack_lsb
from ct_convert.plan import Plan
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.safetensors_out import TensorSpec
from ct_convert.targets.gptq.facts import CHECKPOINT_FORMATS, QUANT_METHOD, V1_ZERO_OFFSET
from ct_convert.targets.int_writer import IntWeightWriter, fp16_scales, unsigned_codes, unsigned_zeros
from ct_convert.targets.writer_base import RepackOptions


def pack_along_last(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., C] -> int32 words, a dense LSB-first bit stream along the last dim."""
    if 8 % bits == 0:
        return pack_lsb(values, bits)
    return bitpack.pack(values, bits, bitpack.STREAM)


def dynamic_exclusions(modules: list[str]) -> dict[str, dict]:
    """GPTQModel `dynamic` negative matches: "-:^name$" leaves that module unquantized."""
    return {f"-:^{re.escape(m)}$": {} for m in modules}


class GPTQWriter(IntWeightWriter):
    label = "GPTQ"
    bits = (2, 3, 4, 8)

    def layout_refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        b = info.scheme.num_bits
        n, k = info.shape
        if (k * b) % 32:
            return f"K={k}: {k} {b}-bit codes do not fill whole 32-bit qweight words"
        if (n * b) % 32:
            return f"N={n}: {n} {b}-bit zero points do not fill whole 32-bit qzeros words"
        return None

    def data_check(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        if opts.gptq_format == "v1" and not info.scheme.symmetric:
            return f"a zero point of {-(1 << (info.scheme.num_bits - 1))} (unsigned 0) cannot be stored in GPTQ v1"
        return None

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        b = info.scheme.num_bits
        n, k = info.shape
        g = info.num_groups
        return [
            TensorSpec("qweight", torch.int32, (k * b // 32, n)),
            TensorSpec("qzeros", torch.int32, (g, n * b // 32)),
            TensorSpec("scales", torch.float16, (g, n)),
            TensorSpec("g_idx", torch.int32, (k,)),
        ]

    def convert(self, qw: QuantizedWeight, opts: RepackOptions) -> dict[str, torch.Tensor]:
        b = qw.scheme.num_bits
        zeros = unsigned_zeros(qw)
        if opts.gptq_format == "v1":
            if bool((zeros == 0).any()):
                raise UnsupportedConversion(
                    f"{qw.name}: zero point {-(1 << (b - 1))} (unsigned 0) cannot be stored in GPTQ v1, "
                    "which stores zero - 1",
                    hint="Use --gptq-format v2, or --target awq for 4-bit weights.",
                )
            zeros = zeros - V1_ZERO_OFFSET
        return {
            "qweight": self._qweight(qw),
            "qzeros": pack_along_last(zeros, b),
            "scales": fp16_scales(qw, self.label),
            "g_idx": qw.column_groups().to(torch.int32),
        }

    def _qweight(self, qw: QuantizedWeight) -> torch.Tensor:
        """[K*b/32, N]: a column-wise bit stream along K, i.e. `weight_packed` transposed when that is
        a dense stream with no padding bits (targets.md §0.2), else packed from the codes."""
        b = qw.scheme.num_bits
        packed = qw.packed_stream
        if packed is None:
            packed = pack_along_last(unsigned_codes(qw), b)
        packed = packed.contiguous()  # then torch transposes it in cache-sized blocks (5.6 ms for 29 MB on one core)
        return torch.empty(packed.shape[::-1], dtype=packed.dtype, device=packed.device).copy_(packed.t())

    def quantization_config(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> dict:
        converted = [reader.modules[m] for m in plan.converted()]
        config = {
            "quant_method": QUANT_METHOD,
            "bits": self.config_bits(plan, reader),
            "group_size": self.config_group_size(plan, reader),
            "desc_act": any(i.has_g_idx for i in converted),
            "sym": all(i.scheme.symmetric for i in converted),
            "checkpoint_format": CHECKPOINT_FORMATS[opts.gptq_format],
            "pack_dtype": "int32",
            "static_groups": False,
            "true_sequential": True,
            "damp_percent": 0.01,
            "lm_head": "lm_head" in {i.name for i in converted},
        }
        skipped = self.unconverted(plan, reader)
        if skipped:
            config["dynamic"] = dynamic_exclusions(skipped)
        return config


Writer = GPTQWriter
