"""Element encodings of the float formats: FP4 E2M1, FP6 E2M3, FP8 E4M3FN and E8M0 scales."""

from __future__ import annotations

import torch

# magnitude of the 3 low bits of an E2M1 nibble; bit 3 is the sign (0x8 is -0, decoded as 0)
FP4_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float32)


def fp4_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 codes (0..15) -> float32 values."""
    c = codes.to(torch.int64)
    mag = FP4_E2M1_VALUES.to(codes.device)[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def fp6_e2m3_to_float(codes: torch.Tensor) -> torch.Tensor:
    """uint8 6-bit E2M3 codes -> float32 values (exponent 0 is subnormal m/8)."""
    c = codes.to(torch.int64)
    e = (c >> 3) & 3
    m = (c & 7).to(torch.float32)
    mag = torch.where(e == 0, m / 8, (1 + m / 8) * torch.pow(2.0, (e - 1).to(torch.float32)))
    return torch.where((c & 0x20) != 0, -mag, mag)


def e8m0_to_float(exponents: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents -> float32 powers of two 2^(e-127) (e=0 gives 2^-127, a float32 subnormal)."""
    ones = torch.ones(exponents.shape, dtype=torch.float32, device=exponents.device)
    return torch.ldexp(ones, exponents.to(torch.int32) - 127)


def unpack_fp6(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3C/4] -> uint8 [..., C]: four 6-bit codes per 3 little-endian bytes."""
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], -1, 3)
    v = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    out = torch.stack([(v >> s) & 0x3F for s in (0, 6, 12, 18)], dim=-1)
    return out.reshape(*packed.shape[:-1], -1).to(torch.uint8)


# (bits viewed as, exponent mask) of the IEEE formats: all-ones exponent bits mean Inf or NaN
_EXPONENT = {
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float32: (torch.int32, 0x7F800000),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a float16/bfloat16/float32/float64 tensor, from its exponent bits (several
    times faster than torch.isfinite, which has no vectorized bf16 kernel on CPU)."""
    as_int, mask = _EXPONENT[t.dtype]
    return not bool(((t.contiguous().view(as_int) & mask) == mask).any())
