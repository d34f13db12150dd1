"""Dense output: float `weight` tensors and no quantization_config."""

from __future__ import annotations

from pathlib import Path

from ct_convert.targets.reader_base import HFOutputReader, quant_method


def detect(folder: Path, config) -> bool:
    return quant_method(config) == ""


def open(folder: Path, source_architecture: str | None = None) -> HFOutputReader:
    return HFOutputReader(folder)
