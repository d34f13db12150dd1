"""Dense output: float `weight` tensors and no quantization_config."""

from __future__ import annotations

from pathlib import Path

from ct_convert.readers.targets.base import HFOutputReader, quant_method, register


@register("dense")
class DenseKind:
    def detect(self, folder: Path) -> bool:
        return quant_method(folder) == ""

    def open(self, folder: Path) -> HFOutputReader:
        r = HFOutputReader(folder)
        r.kind = "dense"
        return r
