"""LSB-first integer bit packing shared by every reader and writer.

Two layouts exist for codes packed into 32-bit words along the last dimension:
- "stream": a dense little-endian bit stream; element i occupies stream bits [i*b, i*b+b) and may
  straddle two words (compressed-tensors >= 0.18, GPTQ qweight/qzeros for any b).
- "words": floor(32/b) elements per word, the top bits of each word unused (compressed-tensors <= 0.17).
For b in {1, 2, 4, 8} the two are identical.

All functions work on unsigned codes held in uint8 (0 .. 2^b-1) and int32 words holding bit patterns.
"""

from __future__ import annotations

import math

import torch

STREAM = "stream"
WORDS = "words"
# Input bytes per band of `by_rows`: the shift-and-mask chains here make several temporaries the size
# of their input, which stay in L2 for a band instead of streaming a 30 MB weight through memory once
# per op (Q4_0's stream of a 29 MB weight on one core: 154 ms whole, 31 ms in 512 KiB bands).
BAND_BYTES = 1 << 19

# FasterTransformer's register interleave: slot i of each group of 8 (4-bit) or 4 (8-bit) values holds
# value INTERLEAVE[b][i]. AutoAWQ's nibble order, the Marlin layouts and TensorRT-LLM's mixed GEMM use it.
INTERLEAVE = {4: (0, 2, 4, 6, 1, 3, 5, 7), 8: (0, 2, 1, 3)}


def packed_width(count: int, bits: int, layout: str = STREAM) -> int:
    if layout == STREAM or 32 % bits == 0:
        return math.ceil(count * bits / 32)
    return math.ceil(count / (32 // bits))


def _as_u32_int64(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


def unpack(words: torch.Tensor, bits: int, count: int, layout: str = STREAM) -> torch.Tensor:
    """int32 [..., W] -> uint8 [..., count]: the unsigned codes along the last dimension."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed words must be int32, got {words.dtype}")
    lead = words.shape[:-1]
    if bits in (4, 8) or bits in (1, 2):
        by = words.contiguous().view(torch.uint8)
        if bits == 8:
            out = by
        elif bits == 4:
            out = split_nibbles(by)
        else:
            per = 8 // bits
            shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=words.device)
            out = ((by.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, per * by.shape[-1])
        return out[..., :count].contiguous()
    mask = (1 << bits) - 1
    w = _as_u32_int64(words)
    if layout == WORDS:
        pf = 32 // bits
        shifts = torch.arange(0, pf * bits, bits, dtype=torch.int64, device=words.device)
        out = (w.unsqueeze(-1) >> shifts) & mask
        return out.reshape(*lead, -1)[..., :count].to(torch.uint8)
    # stream: 32 elements use exactly `bits` words; pad the word axis to a whole number of groups
    nwords = w.shape[-1]
    groups = math.ceil(nwords / bits)
    if groups * bits != nwords:
        w = torch.nn.functional.pad(w, (0, groups * bits - nwords))
    w = w.reshape(*lead, groups, bits)
    w = torch.cat((w, torch.zeros_like(w[..., :1])), dim=-1)  # a spill word for the last element
    out = torch.empty(*lead, groups, 32, dtype=torch.uint8, device=words.device)
    for i in range(32):
        start = i * bits
        word, off = divmod(start, 32)
        val = (w[..., word] >> off) | (w[..., word + 1] << (32 - off))
        out[..., i] = (val & mask).to(torch.uint8)
    return out.reshape(*lead, groups * 32)[..., :count].contiguous()


def split_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C] -> uint8 [..., 2C]: element 2j in the low nibble of byte j, 2j+1 in the high.

    Each byte b = 16h + l is widened to a 16-bit lane and (b | b << 4) & 0x0F0F leaves l in the lane's
    low byte and h in its high one: the two outputs of a byte are one little-endian lane, so every
    pass is a contiguous vector loop (writing the two halves into every other byte, as stride-2
    stores, ran 7x slower and was a fifth of a dense conversion's CPU time)."""
    wide = packed.to(torch.int16, memory_format=torch.contiguous_format)
    lanes = torch.bitwise_left_shift(wide, 4).bitwise_or_(wide).bitwise_and_(0x0F0F)
    return lanes.view(torch.uint8)  # [..., C] lanes of two bytes: [..., 2C]


def pack(codes: torch.Tensor, bits: int, layout: str = STREAM) -> torch.Tensor:
    """uint8 [..., C] unsigned codes -> int32 [..., W] words, LSB first along the last dimension."""
    lead = codes.shape[:-1]
    count = codes.shape[-1]
    if 8 % bits == 0:
        return _pack_bytes(codes, bits)
    codes = codes.to(torch.int64)
    if layout == WORDS and 32 % bits != 0:
        pf = 32 // bits
        width = math.ceil(count / pf)
        c = torch.nn.functional.pad(codes, (0, width * pf - count)).reshape(*lead, width, pf)
        shifts = torch.arange(0, pf * bits, bits, dtype=torch.int64, device=codes.device)
        words = (c << shifts).sum(dim=-1)
        return to_int32(words)
    width = math.ceil(count * bits / 32)
    codes = codes.to(torch.int64, copy=False)
    groups = math.ceil(count / 32)
    c = torch.nn.functional.pad(codes, (0, groups * 32 - count)).reshape(*lead, groups, 32)
    words = torch.zeros(*lead, groups, bits + 1, dtype=torch.int64, device=codes.device)
    for i in range(32):
        word, off = divmod(i * bits, 32)
        v = c[..., i] << off
        words[..., word] |= v & 0xFFFFFFFF
        words[..., word + 1] |= v >> 32
    return to_int32(words[..., :bits].reshape(*lead, groups * bits)[..., :width])


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """1/2/4/8-bit codes never straddle a byte: pack bytes, then read every 4 bytes as one word."""
    per = 8 // bits
    count = codes.shape[-1]
    width = math.ceil(count * bits / 32)
    v = codes.to(torch.uint8)
    if width * 4 * per != count:
        v = torch.nn.functional.pad(v, (0, width * 4 * per - count))
    if bits == 4:
        return pack_nibbles(v).view(torch.int32)
    # a fresh tensor has the strides `view(torch.int32)` needs, even for size-1 dimensions
    packed = torch.empty(*v.shape[:-1], width * 4, dtype=torch.uint8, device=v.device)
    packed.copy_(v[..., 0::per])
    for i in range(1, per):
        packed |= v[..., i::per] << (bits * i)
    return packed.view(torch.int32)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [..., 2C] -> uint8 [..., C], code 2j in the low nibble of byte j, the inverse of
    `split_nibbles`: codes 2j and 2j+1 are one little-endian 16-bit lane l + 256h, and (x | x >> 4)
    keeps l + 16h in its low byte (contiguous vector passes; picking every other byte ran ~6x slower)."""
    codes = codes.view(torch.uint8) if codes.dtype == torch.int8 else codes.to(torch.uint8)
    try:
        lanes = codes.contiguous().view(torch.int16)
    except RuntimeError:  # a view at an odd byte offset, or with odd strides on size-1 dimensions
        lanes = codes.clone(memory_format=torch.contiguous_format).view(torch.int16)
    return torch.bitwise_right_shift(lanes, 4).bitwise_or_(lanes).to(torch.uint8)


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    w = words & 0xFFFFFFFF
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).contiguous()


# Delta swaps: the whole-tensor integer steps that move codes between packed words without unpacking
# them (readers turn a layout's words into the LSB-first stream with a few of these). Each takes a
# scratch tensor to work in: a fresh temporary per step costs more in page faults than the step itself.
def exchange(a: torch.Tensor, b: torch.Tensor, shift: int, mask: int, scratch: torch.Tensor) -> None:
    """In place: the bits of `a` under `mask << shift` trade places with the bits of `b` under `mask`
    (one step of a bit-matrix transpose whose rows are the words of a and b). `scratch`: contiguous,
    a's dtype, at least a's size."""
    t = torch.bitwise_right_shift(a, shift, out=_part(scratch, a))
    t ^= b
    t &= mask
    b ^= t
    t <<= shift
    a ^= t


def shuffle(x: torch.Tensor, shift: int, mask: int, scratch: torch.Tensor) -> torch.Tensor:
    """In place, and returned: in each word of `x`, its bits under `mask` and those under
    `mask << shift` trade places. `scratch` as for `exchange`."""
    t = torch.bitwise_right_shift(x, shift, out=_part(scratch, x))
    t ^= x
    t &= mask
    x ^= t
    t <<= shift
    return x.bitwise_xor_(t)


def _part(scratch: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scratch.view(-1)[: like.numel()].view(like.shape)

def by_rows(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """fn(*tensors) for a fn that maps the rows (dim 0) of its inputs to rows of its output, one to one
    and independently, computed BAND_BYTES of the first input at a time."""
    rows = tensors[0].shape[0]
    row_bytes = tensors[0][0].numel() * tensors[0].element_size() if rows else 0
    step = max(1, BAND_BYTES // max(1, row_bytes))
    if step >= rows:
        return fn(*tensors)
    first = fn(*(t[:step] for t in tensors))
    out = torch.empty((rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
    out[:step] = first
    for r in range(step, rows, step):
        out[r:r + step] = fn(*(t[r:r + step] for t in tensors))
    return out
