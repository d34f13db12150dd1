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


def dequantize_groups(codes_nk: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """w[n, k] = (u[n, k] - z[g(k), n]) * s[g(k), n] as exact float32 [N, K].

    `codes_nk` [N, K] unsigned (any strides: transposing one-byte codes is the cheap place to do
    it), `zeros`/`scales` [G, N]; g(k) = cols[k], or k // (K / G) when cols is None. Contiguous
    groups broadcast per group instead of gathering a [N, K] copy of z and s.
    """
    n, k = codes_nk.shape
    g = scales.shape[0]
    z = zeros.to(torch.float32).t()
    s = scales.to(torch.float32).t()
    if cols is None:
        v = codes_nk.contiguous().reshape(n, g, k // g).to(torch.float32)
        v.sub_(z.unsqueeze(-1)).mul_(s.unsqueeze(-1))
        return v.reshape(n, k)
    v = codes_nk.to(torch.float32)
    return v.sub_(z.index_select(1, cols)).mul_(s.index_select(1, cols))


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, W] -> uint8 [R, W, 8]: the 8 nibbles of each word, least significant first."""
    b = words.contiguous().view(torch.uint8).reshape(*words.shape, 4)
    return torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*words.shape, 8)


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
