"""A file written and hashed in the background: the caller hands over buffers and moves on.

Writing and sha256 both release the GIL, so two threads do them side by side while the caller
computes what comes next; at most MAX_PENDING buffers wait, which bounds memory. The sha256 of a
file is computed from the bytes as they are written, never by reading the file back.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from ct_convert.errors import OutputError

MAX_PENDING = 3
# Bytes per write(): the page cache takes folios as large as a write, and on a VM whose balloon hands
# free memory back to its host (free page reporting), large folios come from blocks the host must fault
# in again. 3.2 GB written in 64 MiB calls took 11.6 s there, in 128 KiB calls 0.85 s (256 KiB: 2.5 s);
# on memory the host has not taken back both take ~1 s.
WRITE_SLICE = 1 << 17
GATHER_BYTES = 1 << 20  # pieces smaller than this are copied into one buffer and handed over together


class HashingSink:
    """File-like (`write`, `tell`, `flush`, `close`) over an open binary file; `finish()` -> (sha256, size)."""

    def __init__(self, f: BinaryIO, path: Path):
        self.path = path
        self.size = 0
        self._f = f
        self._sha = hashlib.sha256()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ct-write")
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ct-hash")
        self._pending: deque[tuple[Future, Future]] = deque()
        self._gathered = bytearray()
        self._closed = False

    @classmethod
    def create(cls, path: Path) -> "HashingSink":
        try:
            return cls(open(path, "wb"), path)
        except OSError as e:
            raise OutputError(f"{path}: cannot create: {e.strerror or e}") from None

    def _write(self, data) -> None:
        view = memoryview(data).cast("B")
        try:
            for at in range(0, view.nbytes, WRITE_SLICE):
                self._f.write(view[at:at + WRITE_SLICE])
        except OSError as e:
            raise OutputError(f"{self.path}: write failed: {e.strerror or e}") from None

    def write(self, data) -> int:
        """Queue `data` (bytes-like, left unmodified by the caller until the file is finished). Small
        pieces are gathered into one buffer first: a MoE layer's thousands of small tensors would
        otherwise cost two thread hand-offs each."""
        n = memoryview(data).nbytes
        self.size += n
        if n < GATHER_BYTES:
            self._gathered += memoryview(data).cast("B")
            if len(self._gathered) >= GATHER_BYTES:
                self._hand_over_gathered()
            return n
        self._hand_over_gathered()
        self._submit(data)
        return n

    def _hand_over_gathered(self) -> None:
        if self._gathered:
            data, self._gathered = self._gathered, bytearray()
            self._submit(data)

    def _submit(self, data) -> None:
        while len(self._pending) >= MAX_PENDING:
            for f in self._pending.popleft():
                f.result()
        self._pending.append((self._io.submit(self._write, data), self._hasher.submit(self._sha.update, data)))

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._drain()
        self._f.flush()

    def _drain(self) -> None:
        self._hand_over_gathered()
        while self._pending:
            for f in self._pending.popleft():
                f.result()

    def finish(self) -> tuple[str, int]:
        """Write everything queued, close the file and return its (sha256, size)."""
        self.close()
        return self._sha.hexdigest(), self.size

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._drain()
            self._f.close()
        except OSError as e:
            raise OutputError(f"{self.path}: write failed: {e.strerror or e}") from None
        finally:
            self._closed = True
            self._io.shutdown()
            self._hasher.shutdown()

    def abort(self) -> None:
        """Drop what is queued and close the file (the output folder is removed by its transaction)."""
        for pair in self._pending:
            for f in pair:
                f.cancel()
        self._io.shutdown(wait=True)
        self._hasher.shutdown(wait=True)
        self._closed = True
        self._f.close()
