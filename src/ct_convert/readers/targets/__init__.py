"""Readers of ct-convert's output layouts, written independently of the writers, for `verify`.

Each reader dequantizes an output module from the target's own layout definition (targets.md), so a
writer bug cannot hide behind a reader that shares its code.
"""

from __future__ import annotations

from pathlib import Path

from ct_convert.errors import InputError
from ct_convert.readers.targets.base import OUTPUT_READERS, OutputReader

from ct_convert.targets.modelopt import reader as _modelopt  # noqa: F401,E402  (first: its folder also has config.json + safetensors)
from ct_convert.readers.targets import trtllm  # noqa: F401,E402  (before dense: its config.json has no quantization_config)
from ct_convert.targets.mlx import reader as _mlx_reader  # noqa: F401,E402  (before dense: an all-float MLX output has no quantization block)
from ct_convert.readers.targets import dense  # noqa: F401,E402  (registration)
from ct_convert.readers.targets import awq, gptq, marlin  # noqa: F401,E402


def open_output(folder: Path) -> OutputReader:
    if not folder.exists():
        raise InputError(f"{folder}: no such output folder")
    for kind, reader in OUTPUT_READERS.items():
        if reader.detect(folder):
            return reader.open(folder)
    raise InputError(f"{folder}: not a checkpoint ct-convert can read back (no known layout detected)")


__all__ = ["open_output", "OutputReader"]
from ct_convert.readers.targets import gguf  # noqa: F401,E402
