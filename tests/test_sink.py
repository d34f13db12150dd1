"""HashingSink: the file and its sha256 hold every byte in order, small pieces gathered into shared
writes, large ones handed over as they are."""

from __future__ import annotations

import hashlib
import os

from ct_convert import sink
from ct_convert.sink import HashingSink


def test_small_pieces_are_gathered_and_bytes_keep_their_order(tmp_path, monkeypatch):
    calls = []
    real = HashingSink._write

    def counted(self, data):
        calls.append(memoryview(data).nbytes)
        return real(self, data)

    monkeypatch.setattr(HashingSink, "_write", counted)
    monkeypatch.setattr(sink, "GATHER_BYTES", 1000)
    pieces = [os.urandom(n) for n in (10, 300, 700, 5, 2500, 999, 1, 1000, 40)]
    out = HashingSink.create(tmp_path / "f")
    for p in pieces:
        out.write(bytearray(p))
    digest, size = out.finish()
    whole = b"".join(pieces)
    assert (tmp_path / "f").read_bytes() == whole and size == len(whole)
    assert digest == hashlib.sha256(whole).hexdigest()
    # 10+300+700 gathered; 5 then 2500 (own write); 999+1; 1000 (own write); 40 at the end
    assert calls == [1010, 5, 2500, 1000, 1000, 40]
