"""GPTQ output (targets.md §3): `qweight` a bit stream along K per column, `qzeros` one along N per
group (stored minus one in v1), `g_idx` the group of each input row; w = (u - z[g_idx]) * scale."""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert import bitpack
from ct_convert.errors import InputError
from ct_convert.targets.gptq.facts import CHECKPOINT_FORMATS, QUANT_METHOD, V1_ZERO_OFFSET
from ct_convert.targets.reader_base import GroupCodes, HFOutputReader, quant_method


class GPTQOutput(HFOutputReader):
    working_bytes_per_weight = 4  # one byte per code on each side, then a few temporaries

    def decode(self, module: str) -> GroupCodes | None:
        if f"{module}.qweight" not in self.store:
            return None
        qc = self.config["quantization_config"]
        b = int(qc["bits"])
        fmt = qc.get("checkpoint_format", qc.get("format", CHECKPOINT_FORMATS["v1"]))
        if fmt not in CHECKPOINT_FORMATS.values():
            raise InputError(f"{self.folder}: GPTQ checkpoint_format {fmt!r} cannot be read back")
        qweight = self.store.get(f"{module}.qweight")  # [K*b/32, N]
        scales = self.store.get(f"{module}.scales")  # [G, N]
        g_idx = self.store.get(f"{module}.g_idx").to(torch.int64)  # [K]
        k, n = g_idx.numel(), qweight.shape[1]
        stream = qweight.t()  # each column of qweight is one bit stream along K
        z = bitpack.unpack(self.store.get(f"{module}.qzeros"), b, n, bitpack.STREAM).to(torch.int16)  # [G, N]
        if fmt == CHECKPOINT_FORMATS["v1"]:
            z = z + V1_ZERO_OFFSET  # readers add it back without masking
        g = scales.shape[0]
        if z.shape != scales.shape or int(g_idx.min()) < 0 or int(g_idx.max()) >= g:
            raise InputError(f"{module}: qzeros {list(z.shape)}, scales {list(scales.shape)} and g_idx disagree")
        plain = k % g == 0 and torch.equal(g_idx, torch.arange(k) // (k // g))
        return GroupCodes(
            lambda: bitpack.unpack(stream.contiguous(), b, k, bitpack.STREAM),
            z, scales, None if plain else g_idx, stream=stream,
        )


def detect(folder: Path, config) -> bool:
    return quant_method(config) == QUANT_METHOD


def open(folder: Path, source_architecture: str | None = None) -> GPTQOutput:
    return GPTQOutput(folder)
