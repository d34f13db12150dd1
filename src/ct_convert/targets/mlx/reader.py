"""MLX output read back for `verify`, independently of the writer: codes are unpacked the way MLX's
reference `affine_dequantize` reads them (every bit of each uint32 word in order, then each run of b
bits one code), zero points are recovered from the stored biases (z = -biases / scales, which must be
an integer), and the float modes are decoded from the E2M1 / E4M3 / E8M0 definitions (facts.py).
A module that is one expert of a stacked `switch_mlp` tensor is read as that slice alone.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ct_convert import bitpack
from ct_convert.bands import Bands, banded
from ct_convert.errors import InputError
from ct_convert.targets.reader_base import GroupCodes, open_store
from ct_convert.jsonfile import load_json
from ct_convert.targets.mlx import facts
from ct_convert.tensorstore import read_header, read_tensor

_BAND = 1 << 22  # bits expanded per band of rows when unpacking


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 [R, W] -> uint8 [R, 32W/b] unsigned codes (bit i of the row's stream is bit i % 32 of
    word i // 32; code j is stream bits [j*b, j*b+b), least significant first)."""
    r, w = words.shape
    k = w * 32 // bits
    signed = words.contiguous().view(torch.int32)
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    place = (1 << torch.arange(bits, dtype=torch.int32, device=words.device))
    out = torch.empty(r, k, dtype=torch.uint8, device=words.device)
    step = max(1, _BAND // max(1, 32 * w))
    for a in range(0, r, step):
        stream = (signed[a:a + step].unsqueeze(-1) >> shifts) & 1  # [rows, W, 32]
        out[a:a + step] = (stream.reshape(-1, k, bits) * place).sum(-1).to(torch.uint8)
    return out


def e2m1_values(nibbles: torch.Tensor) -> torch.Tensor:
    mag = torch.tensor(facts.E2M1_MAGNITUDES, dtype=torch.float32, device=nibbles.device)[(nibbles & 7).to(torch.int64)]
    return torch.where((nibbles & 8) != 0, -mag, mag)


class MLXOutput:
    working_bytes_per_weight = 12  # unpacked codes, their float32 values and the source's
    code_bytes_per_weight = 3  # affine layers compared as codes: the stored words are the stream

    def __init__(self, folder: Path):
        self.folder = folder
        self.store = open_store(folder)
        self.config = load_json(folder / "config.json")
        q = self.config.get("quantization")
        self.quantization = q if isinstance(q, dict) else {}
        self.arch = facts.architecture(self.config)
        self._fds: dict[Path, int] = {}

    # -- reading -------------------------------------------------------------------------------
    def _locate(self, module: str) -> tuple[str, int | None]:
        return self.arch.locate(module) if self.arch is not None else (module, None)

    def _get(self, name: str, expert: int | None) -> torch.Tensor:
        if expert is None:
            return self.store.get(name)
        meta = self.store.meta(name)
        if not meta.shape or expert >= meta.shape[0]:
            raise InputError(f"{self.folder}: {name} {list(meta.shape)} has no expert {expert}")
        per = meta.nbytes // meta.shape[0]
        start = meta.offsets[0] + expert * per
        fd = self._fds.get(meta.file)
        if fd is None:
            fd = self._fds[meta.file] = os.open(meta.file, os.O_RDONLY)
        return read_tensor(fd, dataclasses.replace(meta, shape=meta.shape[1:], offsets=(start, start + per)))

    def _params(self, path: str, words: torch.Tensor, scales: torch.Tensor) -> tuple[str, int, int]:
        entry = self.quantization.get(path, self.quantization)
        if not isinstance(entry, dict) or "bits" not in entry or "group_size" not in entry:
            raise InputError(f"{self.folder}: config.json's quantization says nothing of quantized layer {path}")
        mode, bits, gs = entry.get("mode", facts.AFFINE), int(entry["bits"]), int(entry["group_size"])
        if words.dtype != torch.uint32 or words.shape[-1] * 32 != scales.shape[-1] * gs * bits:
            raise InputError(
                f"{path}: weight {words.dtype} {list(words.shape)} and scales {list(scales.shape)} "
                f"do not fit {bits}-bit {mode} groups of {gs}"
            )
        return mode, bits, gs

    def _quantized(self, module: str):
        path, expert = self._locate(module)
        if f"{path}.scales" not in self.store:
            return None
        words = self._get(f"{path}.weight", expert)
        scales = self._get(f"{path}.scales", expert)
        mode, bits, gs = self._params(path, words, scales)
        biases = self._get(f"{path}.biases", expert) if mode == facts.AFFINE else None
        return path, words, scales, biases, mode, bits, gs

    # -- the OutputReader protocol ---------------------------------------------------------------
    def bytes_per_weight(self, module: str) -> int:
        path, _ = self._locate(module)
        entry = self.quantization.get(path, self.quantization)
        affine = f"{path}.scales" in self.store and isinstance(entry, dict) and entry.get("mode", facts.AFFINE) == facts.AFFINE
        return self.code_bytes_per_weight if affine else self.working_bytes_per_weight

    def decode(self, module: str) -> GroupCodes | None:
        q = self._quantized(module)
        if q is None or q[4] != facts.AFFINE or q[1].dim() != 2:
            return None
        _, words, scales, biases, _, bits, _ = q
        # b = -z * s exactly, so -b / s rounds to z exactly; a zero scale gives NaN or Inf and fails
        z = biases.to(torch.float32).neg_().div_(scales.to(torch.float32))
        whole = z.round()
        if not (torch.equal(whole, z) and float(whole.min()) >= 0 and float(whole.max()) < (1 << bits)):
            return None  # not a zero-point form: compared dequantized
        return GroupCodes(lambda: unpack_codes(words, bits), whole.to(torch.int16).t(), scales.t(), stream=words.view(torch.int32))

    def dequantize(self, module: str) -> torch.Tensor | None:
        """Quantized layers in float32, exact for bf16/fp16 scales (s * q + b = s * (q - z) has at most
        20 significant bits, E2M1/E4M3 values times E4M3/E8M0 scales at most 8); float layers as stored."""
        q = self._quantized(module)
        if q is None:
            path, expert = self._locate(module)
            return self._get(f"{path}.weight", expert) if f"{path}.weight" in self.store else None
        path, words, scales, biases, mode, bits, gs = q
        lead = words.shape[:-1]
        if mode == facts.AFFINE:
            # float32 scales: s * q + b needs up to 33 bits, so it is computed in float64 and rounded once
            work = torch.float64 if scales.dtype == torch.float32 else torch.float32
            u = unpack_codes(words.reshape(-1, words.shape[-1]), bits).reshape(*lead, -1, gs).to(work)
            w = u.mul_(scales.to(work).unsqueeze(-1)).add_(biases.to(work).unsqueeze(-1))
            return w.reshape(*lead, -1).to(torch.float32)
        by = words.contiguous().view(torch.uint8)
        if bits == 4:
            nibbles = bitpack.split_nibbles(by)
            values = e2m1_values(nibbles)
        else:
            values = by.view(torch.float8_e4m3fn).to(torch.float32)
        if mode == "nvfp4":
            scale = scales.view(torch.float8_e4m3fn).to(torch.float32)
            if f"{path}.global_scale" in self.store:
                raise InputError(f"{path}: nvfp4 layers with a global_scale cannot be read back")
        else:
            scale = torch.ldexp(torch.ones_like(scales, dtype=torch.float32), scales.to(torch.int32) - facts.E8M0_BIAS)
        w = values.reshape(*lead, -1, gs).mul_(scale.unsqueeze(-1))
        return w.reshape(*lead, -1)

    def tensor(self, name: str) -> torch.Tensor | None:
        return self.store.get(name) if name in self.store else None

    def tensor_bands(self, name: str) -> Bands | None:
        return banded(self.store, name) if name in self.store else None

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


def detect(folder: Path, config) -> bool:
    """config.json has mlx-lm's `quantization` block, or the weights say they were written for MLX."""
    q = config.get("quantization") if isinstance(config, dict) else None
    if isinstance(q, dict) and "bits" in q and "group_size" in q:
        return True
    if config is None:
        return False
    shards = sorted(folder.glob("model*.safetensors"))
    try:
        return bool(shards) and read_header(shards[0])[1].get("format") == facts.SAFETENSORS_METADATA["format"]
    except InputError:
        return False


def open(folder: Path, source_architecture: str | None = None) -> MLXOutput:
    return MLXOutput(folder)
