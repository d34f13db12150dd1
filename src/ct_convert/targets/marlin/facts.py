"""Facts of the IST-DASLab Marlin checkpoint (targets.md §1.9) that the writer and the reader share."""

import torch

from ct_convert.marlin_layout import scale_perm, scale_perm_single

QUANT_METHOD = "marlin"
BITS = 4
ZERO = 8  # symmetric 4-bit: w = (u - 8) * s


def scale_order(groups: int) -> torch.Tensor:
    """Which original column each position of a block of stored `s` holds (grouped, or one group)."""
    return scale_perm() if groups > 1 else scale_perm_single()
