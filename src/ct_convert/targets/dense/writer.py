"""`--target dense`: a plain Hugging Face checkpoint with float weights and no quantization_config."""

from __future__ import annotations

from ct_convert.plan import Plan
from ct_convert.qweight import ModuleInfo, QuantizedWeight
from ct_convert.readers.checkpoint import SourceReader
from ct_convert.safetensors_out import TensorSpec
from ct_convert.targets.hf_writer import HFWriter
from ct_convert.targets.writer_base import RepackOptions


class DenseWriter(HFWriter):

    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        return None

    def specs(self, info: ModuleInfo, opts: RepackOptions) -> list[TensorSpec]:
        return [TensorSpec("weight", opts.dtype or info.dtype, info.shape)]

    def convert(self, qw: QuantizedWeight, opts: RepackOptions) -> dict:
        return {"weight": qw.dequantized_bands(opts.dtype or qw.dtype)}

    def quantization_config(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        return None


Writer = DenseWriter
