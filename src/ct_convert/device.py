"""Optional CUDA execution of the repacking kernels; every path here has a CPU twin giving the same bytes."""

from __future__ import annotations

from ct_convert.errors import CTConvertError


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> str:
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not cuda_available():
            raise CTConvertError("--device cuda: no CUDA device is available", hint="Use --device cpu (or auto).")
        return "cuda"
    return "cuda" if cuda_available() else "cpu"
