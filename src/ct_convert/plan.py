"""The plan of one conversion, made once before anything is written: every output tensor, which
source modules or tensors it is made from and how, and each module's fate with the reason.

A target's `plan` builds it; `repack` checks it (refusals), writes it and puts it in the manifest;
`inspect` shows it. Units express merges (several sources into one output: stacked experts, fused
q/k/v, tensor-parallel ranks are outputs of one unit) and splits (one source into several outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ct_convert.errors import CTConvertError

# how a unit's outputs are produced
ENCODE = "encode"  # the module in the target's own layout
DEQUANTIZE = "dequantize"  # the module's weight in float: a fallback, `reason` says why
CARRY = "carry"  # source tensors copied (cast to the output dtype)
CONSTANT = "constant"  # computed from the config or the plan, no source tensor read while writing

# what becomes of a quantized source module (the manifest's "status")
CONVERTED = "converted"
FALLBACK = "dense"  # written unquantized
REFUSED = "refused"

AT_REPACK = "decided at repack"  # what `inspect` says where only the data can decide


@dataclass
class Output:
    """One tensor as written."""

    name: str
    dtype: str  # a torch dtype name ("int32", "bfloat16") for safetensors, a ggml type ("Q4_0") for GGUF
    shape: tuple[int, ...]
    nbytes: int
    file: str = ""  # the output file that holds it

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def tensor_output(name: str, dtype: torch.dtype, shape, file: str = "") -> Output:
    shape = tuple(int(s) for s in shape)
    return Output(name, str(dtype).removeprefix("torch."), shape, math.prod(shape) * dtype.itemsize, file)


@dataclass
class Unit:
    """One piece of work: `sources` are read once and `outputs` written from them."""

    sources: tuple[str, ...]  # source modules or tensors, in merge order (experts, q/k/v, ...)
    outputs: list[Output]
    how: str  # ENCODE | DEQUANTIZE | CARRY | CONSTANT
    reason: str | None = None  # why a module is written as a fallback
    source_bytes: int = 0  # what reading the sources costs (progress, memory in flight)
    detail: object = None  # what the target's writer needs beyond this (its own per-unit facts)


@dataclass
class ModulePlan:
    """The fate of one quantized source module."""

    status: str  # CONVERTED | FALLBACK | REFUSED
    reason: str | None = None  # why refused, or why written as a fallback
    at_repack: str | None = None  # inspect only: what repack decides from the data (scales, ...)
    manifest: dict = field(default_factory=dict)  # facts the manifest records beside the status
    details: dict | None = None  # inspect's "details": what the module becomes there (trtllm: its quant_algo)


@dataclass
class Plan:
    target: str
    inspecting: bool = False  # made for `inspect`: header facts only, refusals recorded, not raised
    units: list[Unit] = field(default_factory=list)
    modules: dict[str, ModulePlan] = field(default_factory=dict)
    fallbacks: list[dict] = field(default_factory=list)  # the manifest's "fallbacks", in order
    dropped: list[str] = field(default_factory=list)  # source tensors not written (the reason: notes / README)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # notes also printed on stderr, even with --json: parts not written
    blocked: str | None = None  # inspect only: why the whole checkpoint is refused
    at_repack: str | None = None  # inspect only: what repack decides for the whole checkpoint
    detail: object = None  # target-wide facts its writer needs

    def refuse_modules(self, error: CTConvertError) -> None:
        """Modules the target cannot hold (already recorded as REFUSED): repack stops here; inspect
        goes on, to say what becomes of the others."""
        if not self.inspecting:
            raise error

    def outputs(self):
        for unit in self.units:
            yield from unit.outputs

    def written(self) -> dict[str, ModulePlan]:
        return {m: p for m, p in self.modules.items() if p.status != REFUSED}

    def converted(self) -> list[str]:
        return [m for m, p in self.modules.items() if p.status == CONVERTED]

    def manifest_modules(self) -> dict[str, dict]:
        return {m: {"status": p.status, **p.manifest} for m, p in self.written().items()}

    def module_verdict(self, module: str) -> tuple[bool | str, str | None]:
        """For `inspect`: (True, None), (False, why) or (AT_REPACK, what repack decides)."""
        p = self.modules.get(module)
        if p is not None and p.status != CONVERTED:
            return False, p.reason
        if self.blocked is not None or p is None:
            return False, self.blocked
        pending = "; ".join(x for x in (p.at_repack, self.at_repack) if x)
        return (AT_REPACK, pending) if pending else (True, None)
