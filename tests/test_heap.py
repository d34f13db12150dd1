"""The heap keeps what a buffer freed for the next one, instead of faulting fresh pages in each time,
and gives it back when asked. Buffers come from numpy: plain malloc, as torch's CPU allocator uses
(torch aligns its blocks, which makes same-size reuse depend on what lies next to them)."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from ct_convert import heap


def _faults_of_a_filled_buffer(nbytes: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buf = np.ones(nbytes, dtype=np.uint8)
    del buf
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_buffers_are_reused_without_page_faults():
    if heap._libc() is None:
        pytest.skip("not glibc: the system allocator is left as it is")
    nbytes = 64 << 20  # over glibc's largest mmap threshold: mapped afresh (and faulted in) by default
    heap.keep_freed()
    _faults_of_a_filled_buffer(nbytes)
    assert _faults_of_a_filled_buffer(nbytes) <= 2
    heap.return_freed()
    assert _faults_of_a_filled_buffer(nbytes) > 16  # given back: faulted in again
