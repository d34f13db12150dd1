"""The heap keeps what two buffers freed for the next two, instead of faulting fresh pages in each
time, and gives it back when asked. Buffers come from numpy: plain malloc, as torch's CPU allocator
uses (torch aligns its blocks, which makes reuse depend on what lies next to them)."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from ct_convert import heap


def _faults_of_two_buffers(nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = np.ones(nbytes, dtype=np.uint8)
    b = np.ones(nbytes, dtype=np.uint8)
    del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_buffers_are_reused_without_page_faults():
    """glibc's defaults return two freed 24 MB blocks to the system (the top of the heap then exceeds
    twice the mmap threshold) and fault them in again on every round."""
    if heap._libc() is None:
        pytest.skip("not glibc: the system allocator is left as it is")
    heap.keep_freed()
    _faults_of_two_buffers(24 << 20)
    assert _faults_of_two_buffers(24 << 20) <= 2
    heap.return_freed()
    assert _faults_of_two_buffers(24 << 20) > 16  # given back: faulted in again
    _faults_of_two_buffers(64 << 20)
    assert _faults_of_two_buffers(64 << 20) > 16  # over 32 MB: mapped, and returned when freed
