"""A ModelOpt unified HF checkpoint read back as its consumers read it, for `verify`: each module's
`quant_algo` from hf_quant_config.json (`quantized_layers`, or the global algorithm minus the modules
`exclude_modules` matches, the way TensorRT-LLM matches them), then its tensors decoded from facts.py's
table alone. Integer modules come back as codes (`decode`), the rest dequantized as ModelOpt does."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch

from ct_convert import bitpack
from ct_convert.errors import InputError
from ct_convert.jsonfile import load_json
from ct_convert.targets import int4_rows
from ct_convert.targets.reader_base import GroupCodes, HFOutputReader, dequantize_groups, quant_method
from ct_convert.targets.modelopt import facts

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelOptOutput(HFOutputReader):
    working_bytes_per_weight = 12  # float32 of the weight plus the unpacked codes
    code_bytes_per_weight = 4  # integer layouts, compared as codes: the packed weight, its stream, the source's

    def __init__(self, folder: Path):
        super().__init__(folder)
        path = folder / facts.HF_QUANT_CONFIG
        q = load_json(path).get("quantization") if path.is_file() else None
        if not isinstance(q, dict):
            raise InputError(f"{path}: no 'quantization' block (not a ModelOpt checkpoint ct-convert can read back)")
        self.algo = q.get("quant_algo")
        self.group_size = q.get("group_size")
        self.exclude = q.get("exclude_modules") or []
        self.layers = q.get("quantized_layers") or {}
        entries = list(self.layers.values()) if isinstance(self.layers, dict) else [None]
        if (not isinstance(self.exclude, list) or not all(isinstance(p, str) for p in self.exclude)
                or not all(isinstance(e, dict) and isinstance(e.get("quant_algo"), str) for e in entries)
                or not isinstance(self.algo, (str, type(None)))):
            raise InputError(f"{path}: malformed quantization block (quant_algo, exclude_modules or quantized_layers)")
        text = self.config.get("text_config") if isinstance(self.config.get("text_config"), dict) else {}
        name = self.config.get("torch_dtype") or self.config.get("dtype") or text.get("torch_dtype") or text.get("dtype")
        self.model_dtype = _DTYPES.get(str(name).removeprefix("torch."), torch.bfloat16)

    def algorithm(self, module: str) -> tuple[str, int | None] | None:
        if self.algo == facts.MIXED_PRECISION:
            entry = self.layers.get(module)
            found = (entry["quant_algo"], entry.get("group_size")) if entry else None
        elif self.algo is None or self._excluded(module):
            found = None
        else:
            found = self.algo, self.group_size
        if found and found[0] in facts.GROUPED and (type(found[1]) is not int or found[1] <= 0):
            raise InputError(f"{self.folder / facts.HF_QUANT_CONFIG}: {module}: {found[0]} without a positive group_size")
        return found

    def _excluded(self, module: str) -> bool:
        parts = module.split(".")
        names = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in self.exclude)

    def _get(self, module: str, suffix: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        name = f"{module}.{suffix}"
        if name not in self.store:
            raise InputError(f"{self.folder}: missing tensor {name}")
        t = self.store.get(name)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise InputError(f"tensor {name}: shape {list(t.shape)}, expected {list(shape)}")
        return t

    # -- integer modules: codes ---------------------------------------------------------------
    def bytes_per_weight(self, module: str) -> int:
        found = self.algorithm(module)
        return self.code_bytes_per_weight if found and found[0] in (facts.W4A16_AWQ, facts.W8A16) else self.working_bytes_per_weight

    def decode(self, module: str) -> GroupCodes | None:
        found = self.algorithm(module)
        if found is None or f"{module}.weight" not in self.store:
            return None
        algo, gs = found
        w = self._get(module, "weight")
        if w.dim() != 2:
            return None
        if algo == facts.W4A16_AWQ:
            pre = self._get(module, "pre_quant_scale", (w.shape[-1],))
            if not bool((pre == 1).all()):
                return None  # the smoothing multiplies the weight: compared dequantized
            scale = self._awq_scale(module, w, gs)
            stream = int4_rows.stream(w) if w.shape[-1] % 8 == 0 else None
            return GroupCodes(lambda: int4_rows.unsigned_codes(w), 8, scale.t(), stream=stream)
        if algo == facts.W8A16:
            u = w.view(torch.uint8) ^ 0x80  # two's complement + 128 is the top bit flipped
            scale = self._get(module, "weight_scale", (w.shape[0],)).reshape(1, -1)
            return GroupCodes(lambda: u, 128, scale)
        return None

    def _awq_scale(self, module: str, w: torch.Tensor, gs: int) -> torch.Tensor:
        """weight_scale [.., N, K/gs] of a W4A16_AWQ weight uint8 [.., N/2, K]."""
        scale = self._get(module, "weight_scale")
        k = w.shape[-1]
        if tuple(scale.shape) != (*w.shape[:-2], 2 * w.shape[-2], k // gs) or k % gs:
            raise InputError(f"{module}.weight_scale: {list(scale.shape)} does not fit weight {list(w.shape)} with group_size {gs}")
        return scale

    # -- every module: the weight as ModelOpt / TensorRT-LLM compute it ------------------------
    def dequantize(self, module: str) -> torch.Tensor | None:
        if f"{module}.weight" not in self.store:
            return None
        found = self.algorithm(module)
        w = self.store.get(f"{module}.weight")
        if found is None:
            if not w.is_floating_point() or w.element_size() < 2:
                raise InputError(f"{module}.weight: {w.dtype} weight in a module hf_quant_config.json leaves unquantized")
            return w
        algo, gs = found
        f32 = torch.float32
        if algo == facts.W4A16_AWQ:
            u, scale = int4_rows.unsigned_codes(w), self._awq_scale(module, w, gs)
            lead = u.shape[:-2]
            flat_u, flat_s = u.reshape(-1, *u.shape[-2:]), scale.reshape(-1, *scale.shape[-2:])
            out = torch.stack([dequantize_groups(a, 8, s.t()) for a, s in zip(flat_u, flat_s)]).reshape(*lead, *u.shape[-2:])
            # the activation is multiplied by pre_quant_scale: the weight it meets is W * diag(pre)
            return out.mul_(self._get(module, "pre_quant_scale", (*lead, u.shape[-1])).to(f32).unsqueeze(-2))
        lead, (n, k) = tuple(w.shape[:-2]), tuple(w.shape[-2:])
        if algo == facts.W8A16:
            return w.to(f32) * self._get(module, "weight_scale", (*lead, n)).to(f32).unsqueeze(-1)
        if algo == facts.FP8:
            s = self._get(module, "weight_scale", lead).to(f32)
            return w.to(f32) * s.reshape(*s.shape, 1, 1)
        if algo == facts.FP8_PER_CHANNEL_PER_TOKEN:
            return w.to(f32) * self._get(module, "weight_scale", (*lead, n)).to(f32).unsqueeze(-1)
        if algo == facts.FP8_BLOCK_SCALES:
            s = self._get(module, "weight_scale", (*lead, -(-n // gs), -(-k // gs))).to(f32)
            s = s.repeat_interleave(gs, -2)[..., :n, :].repeat_interleave(gs, -1)[..., :k]
            return w.to(f32) * s
        if algo in (facts.NVFP4, facts.W4A16_NVFP4):
            values = E2M1[bitpack.split_nibbles(w).long()]
            block = self._get(module, "weight_scale", (*lead, n, 2 * k // gs))
            if block.dtype != torch.float8_e4m3fn or 2 * k % gs:
                raise InputError(f"{module}.weight_scale: {block.dtype}, NVFP4 block scales are float8_e4m3fn")
            w2 = self._get(module, "weight_scale_2", lead).to(f32)
            per_block = block.to(f32) * w2.reshape(*w2.shape, 1, 1)  # ModelOpt: scale.float() * weight_scale_2
            out = values.reshape(*values.shape[:-1], -1, gs) * per_block.unsqueeze(-1)
            return out.reshape(values.shape).to(self.model_dtype)
        if algo == facts.W4A16_MXFP4:
            values = E2M1[bitpack.split_nibbles(w).long()]
            e = self._get(module, "weight_scale", (*lead, n, 2 * k // gs))
            if e.dtype != torch.uint8 or 2 * k % gs:
                raise InputError(f"{module}.weight_scale: {e.dtype}, MXFP4 scales are E8M0 bytes")
            scale = torch.ldexp(torch.ones(e.shape, dtype=f32), e.to(torch.int32) - 127)
            return (values.reshape(*values.shape[:-1], -1, gs) * scale.unsqueeze(-1)).reshape(values.shape)
        raise InputError(f"{module}: quant_algo {algo} is not one ct-convert reads back")


def detect(folder: Path, config) -> bool:
    return (folder / facts.HF_QUANT_CONFIG).is_file() or quant_method(config) == facts.QUANT_METHOD


def open(folder: Path, source_architecture: str | None = None) -> ModelOptOutput:
    return ModelOptOutput(folder)
