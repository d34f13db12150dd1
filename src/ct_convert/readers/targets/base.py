"""The output-reader protocol and the shared part of readers of Hugging Face style folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from ct_convert.source import find_index, load_json, read_index
from ct_convert.tensorstore import TensorStore


class OutputReader(Protocol):
    kind: str

    def dequantize(self, module: str) -> torch.Tensor | None:
        """The module's weight as the target's consumer would compute it, or None if absent."""

    def tensor(self, name: str) -> torch.Tensor | None:
        """A tensor carried over from the source, by its source name, or None if absent."""


class ReaderKind(Protocol):
    def detect(self, folder: Path) -> bool: ...

    def open(self, folder: Path) -> OutputReader: ...


OUTPUT_READERS: dict[str, ReaderKind] = {}


def register(kind: str):
    def deco(cls):
        OUTPUT_READERS[kind] = cls()
        return cls

    return deco


def quant_method(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    qc = data.get("quantization_config") if isinstance(data, dict) else None
    return str(qc.get("quant_method")) if isinstance(qc, dict) else ""


def open_store(folder: Path) -> TensorStore:
    index = find_index(folder)
    if index is not None:
        files, weight_map = read_index(folder, index)
        return TensorStore(folder, files, weight_map)
    return TensorStore(folder, sorted(folder.glob("*.safetensors")))


class HFOutputReader:
    """A folder of safetensors shards; modules written dense (fallbacks) are read as `.weight`."""

    kind = ""

    def __init__(self, folder: Path):
        self.folder = folder
        self.store = open_store(folder)
        self.config = load_json(folder / "config.json")

    def dequantize(self, module: str) -> torch.Tensor | None:
        if f"{module}.weight" in self.store:
            return self.store.get(f"{module}.weight")
        return self.dequantize_quantized(module)

    def dequantize_quantized(self, module: str) -> torch.Tensor | None:
        return None

    def tensor(self, name: str) -> torch.Tensor | None:
        return self.store.get(name) if name in self.store else None
