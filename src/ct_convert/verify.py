"""Module-by-module comparison of a source checkpoint and a written output, both dequantized."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ct_convert.output import sha256_file
from ct_convert.source import load_json


@dataclass
class ModuleResult:
    module: str
    max_abs_error: float
    rel_error: float
    exact: bool
    ok: bool
    note: str = ""

    def as_json(self) -> dict:
        return asdict(self)


def compare(reader, out_reader, atol: float | None = None, progress=lambda n: None) -> list[ModuleResult]:
    """Dequantize every source module and its output counterpart; exact unless `atol` is given."""
    results = []
    for name, info in reader.modules.items():
        got = out_reader.dequantize(name)
        if got is None:
            results.append(ModuleResult(name, float("inf"), float("inf"), False, False, "missing in output"))
            continue
        ref = reader.read(name).dequantize(got.dtype)
        results.append(_diff(name, ref, got, atol))
        progress(sum(reader.store.meta(t).nbytes for t in info.tensors.values()))
    for t in reader.passthrough():
        if reader.is_quantization_param(t):
            continue
        got = out_reader.tensor(t)
        if got is None:
            continue  # targets may rename or drop carried tensors; their readers map the ones they keep
        ref = reader.get(t)
        if got.dtype != ref.dtype and ref.is_floating_point():
            ref = ref.to(got.dtype)
        results.append(_diff(t, ref, got, atol))
    return results


def _diff(name: str, ref: torch.Tensor, got: torch.Tensor, atol: float | None) -> ModuleResult:
    if tuple(ref.shape) != tuple(got.shape):
        return ModuleResult(name, float("inf"), float("inf"), False, False, f"shape {list(got.shape)} != {list(ref.shape)}")
    if ref.dtype == got.dtype and torch.equal(ref, got):  # the common case, at memory speed
        return ModuleResult(name, 0.0, 0.0, True, True)
    if not ref.is_floating_point():
        exact = bool(torch.equal(ref, got))
        return ModuleResult(name, 0.0 if exact else float("inf"), 0.0 if exact else float("inf"), exact, exact)
    a = ref.to(torch.float32)
    b = got.to(torch.float32)
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = torch.where(both_nan, torch.zeros_like(a), (a - b).abs())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    exact = bool(((a == b) | both_nan).all())
    ok = exact if atol is None else max_abs <= atol
    return ModuleResult(name, max_abs, rel, exact, ok)


def check_manifest(folder: Path) -> list[dict]:
    """Re-hash every file listed in the folder's ct-convert.json: one entry per difference."""
    manifest = load_json(folder / "ct-convert.json")
    problems = []
    listed = manifest.get("files") or {}
    for rel, expect in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append({"file": rel, "problem": "missing"})
            continue
        sha, size = sha256_file(path)
        if size != expect.get("size"):
            problems.append({"file": rel, "problem": f"size {size} != {expect.get('size')}"})
        elif sha != expect.get("sha256"):
            problems.append({"file": rel, "problem": "sha256 differs"})
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_file() and rel != "ct-convert.json" and rel not in listed:
            problems.append({"file": rel, "problem": "not in the manifest"})
    return problems
