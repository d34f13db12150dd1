"""TensorRT-LLM checkpoint (config.json + rank{r}.safetensors), read back per targets.md §4.

Written from the spec, not from the writer: the mixed-GEMM layout (§4.7) is undone with the
closed-form position of every element (which (k, n) each output nibble/byte came from), fused q/k/v
are split by the head counts in config.json, and ranks are concatenated back to HF modules.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ct_convert import bitpack
from ct_convert.bands import Bands, banded
from ct_convert.errors import InputError
from ct_convert.jsonfile import load_json
from ct_convert.targets import int4_rows
from ct_convert.targets.reader_base import GroupCodes, dequantize_groups
from ct_convert.targets.trtllm_legacy.facts import (
    COLUMN,
    NORM,
    NORMS,
    PROJECTION,
    PROJECTIONS,
    REGISTER_ORDER,
    ROW_PERMUTATION,
    SM_METADATA_KEY,
    TOP_LEVEL,
    fused_index,
)
from ct_convert.tensorstore import TensorStore, read_header


def mixed_gemm_source_index(k: int, n: int, bits: int, sm: int) -> torch.Tensor:
    """int64 [K*N]: for each element of the preprocessed stream (in byte / low-nibble-first order),
    its position k*N + n in the row-major [K, N] input."""
    p = torch.arange(k * n, dtype=torch.int64)
    group = len(REGISTER_ORDER[bits])
    q = p // group * group + torch.tensor(REGISTER_ORDER[bits])[p % group]  # before the register shuffle
    il = 16 // bits if sm != 90 else 1
    if il > 1:  # q indexes [N/il, K/64, il, 64]
        e = q % 64
        i = (q // 64) % il
        c = (q // (64 * il)) % (k // 64)
        a = q // (64 * il * (k // 64))
        col, krow = a * il + i, c * 64 + e
    else:
        col, krow = q // k, q % k
    rows = len(ROW_PERMUTATION[bits])
    src_row = krow // rows * rows + torch.tensor(ROW_PERMUTATION[bits])[krow % rows]
    return src_row * n + col


def undo_mixed_gemm(data: torch.Tensor, k: int, n: int, bits: int, sm: int) -> torch.Tensor:
    """Preprocessed bytes (any dtype, K*N*bits/8 bytes) -> signed codes int8 [K, N]."""
    raw = data.contiguous().view(torch.uint8).reshape(-1)
    if bits == 4:
        elems = bitpack.split_nibbles(raw).to(torch.int16) - 8  # a nibble minus 8 is already in [-8, 7]
    else:
        elems = raw.to(torch.int16) - 128
    out = torch.empty(k * n, dtype=torch.int16)
    out[mixed_gemm_source_index(k, n, bits, sm)] = elems
    return out.reshape(k, n).to(torch.int8)


class TRTLLMOutput:

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = load_json(folder / "config.json")
        mapping = self.config.get("mapping") or {}
        self.tp = int(mapping.get("tp_size", 1))
        q = self.config.get("quantization") or {}
        self.algo = q.get("quant_algo")
        self.group_size = q.get("group_size")
        self.sm = _sm_from_metadata(folder)
        # W4A16_AWQ compares as codes; the other layouts need float32 of both sides and temporaries
        self.working_bytes_per_weight = 8 if self.algo == "W4A16_AWQ" else 16
        heads, kv = self.config["num_attention_heads"], self.config.get("num_key_value_heads") or self.config["num_attention_heads"]
        d = self.config["head_size"]
        self.qkv_rows = (heads * d // self.tp, kv * d // self.tp, kv * d // self.tp)
        self.ranks = []
        for r in range(self.tp):
            path = folder / f"rank{r}.safetensors"
            if not path.is_file():
                raise InputError(f"{path}: missing rank file (mapping.tp_size is {self.tp})")
            self.ranks.append(TensorStore(folder, [path]))

    def _get(self, rank: int, name: str) -> torch.Tensor | None:
        store = self.ranks[rank]
        return store.get(name) if name in store else None

    # -- weights -------------------------------------------------------------------------------
    def decode(self, module: str) -> GroupCodes | None:
        """W4A16_AWQ modules as codes, zero point 8 and scales (each rank's weight as the packed stream
        of its codes where K allows, which verification compares by bytes); other layouts are compared
        dequantized."""
        if self.algo != "W4A16_AWQ":
            return None
        gathered = self._gather(module, self._rank_awq_codes)
        if gathered is None:
            return None
        (codes, scales), dim = gathered
        s = torch.cat(scales, dim=dim)
        if all(c.dtype == torch.int32 for c in codes):
            stream = torch.cat(codes, dim=dim)
            return GroupCodes(lambda: int4_rows.codes_of_stream(stream), 8, s.t(), stream=stream)
        u = torch.cat([int4_rows.codes_of_stream(c) if c.dtype == torch.int32 else c for c in codes], dim=dim)
        return GroupCodes(lambda: u, 8, s.t())

    def dequantize(self, module: str) -> torch.Tensor | None:
        if module == "lm_head":
            return self._cat_rows("lm_head.weight")
        gathered = self._gather(module, self._rank_weight)
        if gathered is None:
            return None
        (shards,), dim = gathered
        return torch.cat(shards, dim=dim)

    def _gather(self, module: str, per_rank):
        """`per_rank(rank, trt_name)` (a tensor or a tuple of them) for every rank, rows of fused q/k/v
        cut out: (one tuple of per-rank pieces per tensor, the dimension ranks split), or None."""
        m = PROJECTION.match(module)
        if m is None:
            return None
        (trt, parallel), part = PROJECTIONS[m.group(2)], fused_index(m.group(2))
        name = f"transformer.layers.{m.group(1)}.{trt}"
        pieces = []
        for r in range(self.tp):
            got = per_rank(r, name)
            if got is None:
                return None
            got = (got,) if torch.is_tensor(got) else got
            if trt == "attention.qkv":
                start = sum(self.qkv_rows[:part])
                got = tuple(t[start:start + self.qkv_rows[part]] for t in got)
            pieces.append(got)
        return tuple(zip(*pieces)), 0 if parallel == COLUMN else 1

    def _rank_awq_codes(self, r: int, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        w = self._get(r, f"{name}.weight")
        return self._awq_codes(r, name, w) if w is not None and w.dtype == torch.int8 else None

    def _rank_weight(self, r: int, name: str) -> torch.Tensor | None:
        """One rank's weight [n, k]: float as stored, or float32 values of a quantized layout."""
        w = self._get(r, f"{name}.weight")
        if w is None:
            return None
        if self.algo == "FP8" and w.dtype == torch.float8_e4m3fn:
            return w.to(torch.float32) * self._get(r, f"{name}.weights_scaling_factor").to(torch.float32)
        if self.algo == "W4A16_AWQ" and w.dtype == torch.int8:
            return self._awq(r, name, w)
        if self.algo == "W4A16_GPTQ" and self._get(r, f"{name}.zero") is not None:
            return self._gptq(r, name, w)
        if self.algo in ("W4A16", "W8A16") and w.dtype == torch.int8:
            bits = 4 if self.algo == "W4A16" else 8
            k = w.shape[0]
            n = w.shape[1] * 8 // bits
            codes = undo_mixed_gemm(w, k, n, bits, self._need_sm())
            scale = self._get(r, f"{name}.per_channel_scale").to(torch.float32)
            return codes.t().to(torch.float32) * scale.reshape(-1, 1)
        return w

    def _need_sm(self) -> int:
        if self.sm is None:
            raise InputError(f"{self.folder}: {self.algo} layout depends on the GPU (sm) it was written for, "
                             f"and its rank files' metadata ({SM_METADATA_KEY}) does not say which")
        return self.sm

    def _awq_codes(self, r: int, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A W4A16_AWQ weight int8 [N/2, K] (int4_rows' layout) and its scales [N, G]: the codes as the
        stream int32 [N, K/8] when K is a multiple of 8, else as unsigned codes uint8 [N, K]."""
        n, k = 2 * w.shape[0], w.shape[1]
        scale = self._get(r, f"{name}.weights_scaling_factor")
        if scale is None or scale.shape != (n, k // self.group_size) or k % self.group_size:
            raise InputError(f"{name}.weights_scaling_factor: does not fit weight {[n, k]} with group_size {self.group_size}")
        return (int4_rows.stream(w) if k % 8 == 0 else int4_rows.unsigned_codes(w)), scale

    def _awq(self, r: int, name: str, w: torch.Tensor) -> torch.Tensor:
        codes, scale = self._awq_codes(r, name, w)
        u = int4_rows.codes_of_stream(codes) if codes.dtype == torch.int32 else codes
        return dequantize_groups(u, 8, scale.t())

    def _gptq(self, r: int, name: str, w: torch.Tensor) -> torch.Tensor:
        """The plugin computes s*scale + zero with zero = (8 - z)*scale rounded to the model dtype.
        Recover the integer 8 - z (the rounding moved it by far less than half a scale) and return
        (s + 8 - z) * scale in float32, the exact value the source's (u - z) * scale denotes; a
        stored zero that is not that integer times the scale, rounded once, returns the plugin's
        value instead so the comparison fails."""
        k = w.shape[0]
        n = w.shape[1] * 4
        codes = undo_mixed_gemm(w, k, n, 4, self._need_sm()).to(torch.float32)  # [K, N]
        scale = self._get(r, f"{name}.weights_scaling_factor")  # [G, N]
        zero = self._get(r, f"{name}.zero")
        s32, z32 = scale.to(torch.float32), zero.to(torch.float32)
        offset = torch.round(z32 / torch.where(s32 == 0, torch.ones_like(s32), s32))
        if not torch.equal((offset * s32).to(zero.dtype), zero):
            offset = z32 / s32
        values = codes.reshape(-1, self.group_size, n)  # [G, gs, N]: one scale and offset per group
        values.add_(offset.unsqueeze(1)).mul_(s32.unsqueeze(1))
        return values.reshape(k, n).t().contiguous()

    # -- carried tensors -----------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor | None:
        if name == "lm_head.weight":  # split over ranks by rows
            return self._cat_rows("lm_head.weight")
        if name in TOP_LEVEL:
            return self._get(0, TOP_LEVEL[name])
        m = NORM.match(name)
        if m:
            return self._get(0, f"transformer.layers.{m.group(1)}.{NORMS[m.group(2)]}.weight")
        module, _, suffix = name.rpartition(".")
        if suffix == "weight" and PROJECTION.match(module):
            return self.dequantize(module)
        if suffix == "bias" and PROJECTION.match(module):
            return self._bias(module)
        return None

    def tensor_bands(self, name: str) -> "torch.Tensor | Bands | None":
        """The embedding and lm_head (the large carried tensors), read a band of rows at a time; the
        others whole (`tensor`)."""
        if name == "lm_head.weight":
            stores = [store for store in self.ranks if name in store]
            if len(stores) != self.tp:
                return None
            metas = [store.meta(name) for store in stores]
            shape = (sum(m.shape[0] for m in metas), *metas[0].shape[1:])
            return Bands(metas[0].torch_dtype, shape, lambda: (b for store in stores for b in store.bands(name)))
        if name in TOP_LEVEL and TOP_LEVEL[name] in self.ranks[0]:
            return banded(self.ranks[0], TOP_LEVEL[name])
        return self.tensor(name)

    def _bias(self, module: str) -> torch.Tensor | None:
        m = PROJECTION.match(module)
        (trt, parallel), part = PROJECTIONS[m.group(2)], fused_index(m.group(2))
        name = f"transformer.layers.{m.group(1)}.{trt}.bias"
        if parallel != COLUMN:
            return self._get(0, name)
        shards = []
        for r in range(self.tp):
            b = self._get(r, name)
            if b is None:
                return None
            if trt == "attention.qkv":
                start = sum(self.qkv_rows[:part])
                b = b[start:start + self.qkv_rows[part]]
            shards.append(b)
        return torch.cat(shards)

    def _cat_rows(self, name: str) -> torch.Tensor | None:
        shards = [self._get(r, name) for r in range(self.tp)]
        return None if any(s is None for s in shards) else torch.cat(shards, dim=0)


def _sm_from_metadata(folder: Path) -> int | None:
    """The SM is not part of TensorRT-LLM's config; ct-convert records it in the rank files' metadata."""
    _, meta = read_header(folder / "rank0.safetensors")
    sm = (meta or {}).get(SM_METADATA_KEY)
    return int(sm) if sm and str(sm).isdigit() else None


def detect(folder: Path, config) -> bool:
    return isinstance(config, dict) and "architecture" in config and "mapping" in config and (folder / "rank0.safetensors").is_file()


def open(folder: Path, source_architecture: str | None = None) -> TRTLLMOutput:
    return TRTLLMOutput(folder)
