"""A tensor handed over as consecutive bands of rows instead of whole.

Carried tensors (embeddings, lm_head) can be the largest of a checkpoint (1 GB for Llama-3's 128k
vocabulary): a writer streams them from the source to the output file a band at a time, so memory
holds a few bands, not the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ct_convert import tensorstore


@dataclass(frozen=True)
class Bands:
    """`dtype` and `shape` of the whole; iterating yields its bands along dim 0, read on demand
    (each iteration reads them again)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Iterator[torch.Tensor]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.produce()


def carried(reader, name: str, convert: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype) -> "torch.Tensor | Bands":
    """Source tensor `name` with `convert` (a cast, elementwise per row) applied: whole when small,
    else as Bands read and converted one band at a time."""
    meta = reader.tensor_meta(name)
    if meta.nbytes <= tensorstore.BAND_BYTES or len(meta.shape) < 2:
        return convert(reader.get(name))
    return Bands(dtype, tuple(meta.shape), lambda: (convert(b) for b in reader.bands(name)))


def streamed_cost(nbytes: int) -> int:
    """The working memory `ordered_map` budgets for carrying a tensor whose whole would cost `nbytes`:
    `carried` streams it, so a few bands at most."""
    return min(nbytes, 4 * tensorstore.BAND_BYTES)


def banded(store, name: str) -> Bands:
    """A tensor of a TensorStore, as Bands read on demand."""
    meta = store.meta(name)
    return Bands(meta.torch_dtype, tuple(meta.shape), lambda: store.bands(name))


def pieces(t: "torch.Tensor | Bands") -> Iterator[torch.Tensor]:
    """A tensor's bands: itself when whole."""
    return iter((t,)) if isinstance(t, torch.Tensor) else iter(t)
