"""The writer protocol and the options every target shares."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch

from ct_convert.errors import UnsupportedConversion
from ct_convert.qweight import ModuleInfo

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class RepackOptions:
    target: str
    dtype: torch.dtype | None = None
    device: str = "auto"
    max_shard_size: int = 5 * 10**9
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    keep_unsupported: str | None = None  # "dense": write modules the target cannot hold dequantized
    gptq_format: str = "v1"
    tp_size: int = 1
    sm: int | None = None
    strict: bool = False
    vocab_from: Path | None = None
    nvfp4: bool = False
    approx_input_scales: bool = False
    verify: bool = True

    def as_json(self) -> dict:
        return {
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype else None,
            "device": self.device,
            "max_shard_size": self.max_shard_size,
            "keep_unsupported": self.keep_unsupported,
            "gptq_format": self.gptq_format,
            "tp_size": self.tp_size,
            "sm": self.sm,
            "strict": self.strict,
            "vocab_from": str(self.vocab_from) if self.vocab_from else None,
            "nvfp4": self.nvfp4,
            "approx_input_scales": self.approx_input_scales,
            "verify": self.verify,
        }


@dataclass
class WriteReport:
    """What a writer produced; the pipeline turns it into the manifest."""

    files: dict[str, dict] = field(default_factory=dict)  # relative path -> {"sha256", "size"}
    modules: dict[str, dict] = field(default_factory=dict)  # source module -> {"status", ...}
    dropped: list[str] = field(default_factory=list)  # source tensors not carried, with reason below
    fallbacks: list[dict] = field(default_factory=list)  # modules written in another type than asked
    notes: list[str] = field(default_factory=list)


Progress = Callable[[int], None]  # advance by a number of source bytes


class Writer(Protocol):
    name: str

    def refusal(self, info: ModuleInfo, opts: RepackOptions) -> str | None:
        """Why this module cannot be written exactly (header facts only), or None."""

    def check(self, reader, opts: RepackOptions) -> None:
        """Refuse a whole checkpoint the target cannot hold (architecture, options); raise UnsupportedConversion."""

    def write(self, reader, out: Path, opts: RepackOptions, progress: Progress) -> WriteReport:
        """Write the complete output into `out` (an empty temporary folder)."""


WRITERS: dict[str, Writer] = {}


def register(cls):
    inst = cls()
    WRITERS[inst.name] = inst
    return cls


def writer_for(target: str) -> Writer:
    try:
        return WRITERS[target]
    except KeyError:
        raise UnsupportedConversion(
            f"unknown target {target!r}", hint=f"Choose one of: {', '.join(sorted(WRITERS))}."
        ) from None


def exact_cast(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Cast a float tensor, refusing when any value changes (a bf16 value that fp16 cannot hold)."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    back = out.to(t.dtype)
    same = (back == t) | (torch.isnan(back) & torch.isnan(t))
    if not bool(same.all()):
        bad = int((~same).sum())
        raise UnsupportedConversion(
            f"{what}: {bad} value(s) of {t.dtype} do not fit {dtype} exactly",
            hint="Use --dtype bfloat16 or a target that keeps the source dtype.",
        )
    return out
