"""Process-wide allocator tuning for streaming conversion.

glibc serves every allocation above 128 KiB with a fresh mmap and unmaps it on free, so each module's
temporaries (hundreds of MB) are page-faulted and zeroed anew: measured at more than half of the
time of a 4-bit dequantization. Raising the mmap and trim thresholds lets freed blocks be reused.
Peak RSS is unchanged: it is still the largest set of modules in flight, now simply kept for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory() -> bool:
    """Apply the tuning on glibc; a no-op (False) anywhere else."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
