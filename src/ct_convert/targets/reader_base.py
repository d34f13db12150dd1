"""The output-reader protocol and the shared part of readers of Hugging Face style folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from ct_convert.bands import Bands, banded
from ct_convert.source import find_index, load_json, read_index
from ct_convert.tensorstore import TensorStore


class OutputReader(Protocol):
    working_bytes_per_weight: int  # memory a comparison of one module needs, per weight

    # optional: bytes_per_weight(module) -> int, that memory for this module where it depends on how
    # the module is stored (a quantized tensor compared as codes needs a fraction of one compared as floats)

    def dequantize(self, module: str) -> torch.Tensor | None:
        """The module's weight as the target's consumer would compute it, or None if absent."""

    def decode(self, module: str) -> "GroupCodes | None":
        """The module's integer codes, zero points and scales, or None where the target stores none."""

    def tensor(self, name: str) -> torch.Tensor | None:
        """A tensor carried over from the source, by its source name, or None if absent. A target
        that stores a carried tensor changed (GGUF: Gemma-3's norms as 1 + w) also has
        `as_stored(name, source)`, the value `tensor` must then equal."""

    # optional: tensor_bands(name) -> Bands | None, the same read a band of rows at a time
    # optional: stored_dense(module) -> Bands | None, a module stored as float values, in bands




def quant_method(config) -> str | None:
    """`quantization_config.quant_method` of an output's parsed config.json: None without a readable
    config.json, "" without a quantization_config."""
    if config is None:
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return str(qc.get("quant_method")) if isinstance(qc, dict) else ""


def open_store(folder: Path) -> TensorStore:
    index = find_index(folder)
    if index is not None:
        files, weight_map = read_index(folder, index)
        return TensorStore(folder, files, weight_map)
    return TensorStore(folder, sorted(folder.glob("*.safetensors")))


@dataclass
class GroupCodes:
    """An integer module as a consumer reads it: w[n, k] = (u[n, k] - zeros[g(k), n]) * scales[g(k), n]."""

    unpack: Callable[[], torch.Tensor]  # -> u: a fresh uint8 [N, K], contiguous
    zeros: torch.Tensor | int  # integer [G, N], or one zero point for every group (a symmetric layout's)
    scales: torch.Tensor  # float [G, N]
    cols: torch.Tensor | None = None  # int64 [K]: g(k); None means k // (K / G)
    # int32 [N, W]: each row of u as an LSB-first bit stream, where stored so or cheaper to derive than
    # u (verification then compares it with the source's packed words by bytes)
    stream: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.unpack(), self.zeros, self.scales, self.cols)


def dequantize_groups(codes_nk: torch.Tensor, zeros: torch.Tensor | int, scales: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """w[n, k] = (u[n, k] - z[g(k), n]) * s[g(k), n] as exact float32 [N, K].

    `codes_nk` [N, K] unsigned (any strides: transposing one-byte codes is the cheap place to do
    it), `zeros` [G, N] or one int for all, `scales` [G, N]; g(k) = cols[k], or k // (K / G) when
    cols is None. Contiguous groups broadcast per group instead of gathering a [N, K] copy of z and s.
    """
    n, k = codes_nk.shape
    g = scales.shape[0]
    z = zeros.to(torch.float32).t() if isinstance(zeros, torch.Tensor) else None
    s = scales.to(torch.float32).t()
    if cols is None:
        v = codes_nk.contiguous().reshape(n, g, k // g).to(torch.float32)
        v.sub_(zeros if z is None else z.unsqueeze(-1)).mul_(s.unsqueeze(-1))
        return v.reshape(n, k)
    v = codes_nk.to(torch.float32)
    return v.sub_(zeros if z is None else z.index_select(1, cols)).mul_(s.index_select(1, cols))


class HFOutputReader:
    """A folder of safetensors shards; modules written dense (fallbacks) are read as `.weight`."""

    working_bytes_per_weight = 8  # the weight in the model dtype, read and recomputed, or float32 fallbacks

    def __init__(self, folder: Path):
        self.folder = folder
        self.store = open_store(folder)
        self.config = load_json(folder / "config.json")

    def dequantize(self, module: str) -> torch.Tensor | None:
        if f"{module}.weight" in self.store:
            return self.store.get(f"{module}.weight")
        decoded = self.decode(module)
        return None if decoded is None else decoded.dequantize()

    def decode(self, module: str) -> GroupCodes | None:
        return None

    def stored_dense(self, module: str) -> Bands | None:
        """A module written as a float `.weight`, read a band of rows at a time, or None."""
        return self.tensor_bands(f"{module}.weight")

    def tensor(self, name: str) -> torch.Tensor | None:
        return self.store.get(name) if name in self.store else None

    def tensor_bands(self, name: str) -> Bands | None:
        """`tensor`, read a band of rows at a time (what verifying a large carried tensor reads)."""
        return banded(self.store, name) if name in self.store else None
