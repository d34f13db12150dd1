"""What every target's writer shares: the options, the writer base class, exact casts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ct_convert.errors import CTConvertError, UnsupportedConversion
from ct_convert.output import copy_with_hash, write_bytes_with_hash
from ct_convert.plan import Plan
from ct_convert.readers.checkpoint import SourceReader

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


Progress = Callable[[int], None]  # advance by a number of source bytes
Files = dict[str, dict]  # relative path -> {"sha256", "size"}


def write_json(out: Path, name: str, data: dict, files: Files) -> None:
    """`out/name` as indented, key-sorted JSON, recorded in `files` with its sha256 and size."""
    sha, size = write_bytes_with_hash(out / name, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    files[name] = {"sha256": sha, "size": size}


def copy_other_files(reader: SourceReader, out: Path, files: Files) -> None:
    """The source's files that are not weights or config (tokenizer, generation config, ...), copied
    unchanged and recorded in `files`."""
    for rel in reader.other_files():
        sha, size = copy_with_hash(reader.root / rel, out / rel)
        files[str(rel)] = {"sha256": sha, "size": size}


class TargetWriter:
    """Base of every target's `writer.Writer`: `fill_plan` decides everything from the source before
    any output exists (refusing what the target cannot hold), `write` carries the plan out."""

    def __init__(self, name: str):
        self.name = name  # its name in the target table

    def plan(self, reader: SourceReader, opts: RepackOptions, *, inspecting: bool = False) -> Plan:
        """The plan, or the first refusal raised. `inspecting`: from header facts only, refusals
        recorded in the plan (per module, or `blocked` for the whole checkpoint), never raised."""
        plan = Plan(self.name, inspecting)
        if not inspecting:
            self.fill_plan(plan, reader, opts)
            return plan
        try:
            self.fill_plan(plan, reader, opts)
        except CTConvertError as e:
            plan.blocked = str(e)
        return plan

    def fill_plan(self, plan: Plan, reader: SourceReader, opts: RepackOptions) -> None:
        raise NotImplementedError

    def write(self, plan: Plan, reader: SourceReader, out: Path, opts: RepackOptions, progress: Progress) -> Files:
        """Write the complete output into `out` (an empty temporary folder); the files written."""
        raise NotImplementedError


def refuse_online_transforms(reader: SourceReader, hint: str) -> None:
    if reader.online_transforms:
        raise UnsupportedConversion(
            f"{reader.online_transforms[0]}: online transform (applied at inference) in this checkpoint", hint=hint
        )


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
