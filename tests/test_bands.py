"""Large carried tensors (embeddings, lm_head) are streamed in bands of rows: read, cast, written and
verified a band at a time, never whole, with the same bytes as a whole-tensor copy."""

import json
import struct

import pytest
import torch

import ct_convert.tensorstore as ts
from conftest import FIXTURES
from ct_convert.source import resolve

SOURCE = FIXTURES / "w4a16-g128"  # embed_tokens and lm_head: [64, 128] BF16, 16 KiB each
TARGETS = ["dense", "awq", "gptq", "trtllm", "gguf", "mlx"]


def _files(out):
    return json.loads((out / "ct-convert.json").read_text())["files"]


@pytest.fixture
def reads(monkeypatch):
    """Bands of 1 KiB (4 rows of the fixture's embedding), and every read's (tensor, rows) recorded."""
    monkeypatch.setattr(ts, "BAND_BYTES", 1024)
    seen = []
    original = ts.TensorStore._read

    def spy(self, name, meta, r0, r1):
        seen.append((name, r1 - r0, meta.shape))
        return original(self, name, meta, r0, r1)

    monkeypatch.setattr(ts.TensorStore, "_read", spy)
    return seen


def test_bands_reassemble_every_tensor(reads):
    store = resolve(str(SOURCE), None).store
    for name in store.names:
        whole = store.get(name)
        bands = list(store.bands(name))
        assert all(b.dtype == whole.dtype for b in bands)
        if whole.dim() == 0:
            assert len(bands) == 1 and torch.equal(bands[0], whole)
            continue
        assert torch.equal(torch.cat(bands).view(torch.uint8), whole.view(torch.uint8)), name
        row_bytes = whole[0].numel() * whole.element_size() if whole.shape[0] else 0
        assert all(b.shape[0] * row_bytes <= max(1024, row_bytes) for b in bands), name
    assert len(list(store.bands("model.embed_tokens.weight"))) == 16  # 64 rows of 256 bytes, 4 rows a band


@pytest.mark.parametrize("target", TARGETS)
def test_carried_tensors_are_streamed_with_the_same_bytes(cli, tmp_path, reads, monkeypatch, target):
    assert cli("repack", SOURCE, tmp_path / "banded", "--target", target, "-q").code == 0
    embedding = [rows for name, rows, _ in reads if name == "model.embed_tokens.weight"]
    assert embedding and max(embedding) == 4, embedding  # never more than one band at a time, written and verified
    monkeypatch.setattr(ts, "BAND_BYTES", 64 << 20)
    assert cli("repack", SOURCE, tmp_path / "whole", "--target", target, "-q").code == 0
    assert _files(tmp_path / "banded") == _files(tmp_path / "whole")


def test_verify_finds_one_changed_value_in_the_last_band(cli, tmp_path, reads):
    out = tmp_path / "out"
    assert cli("repack", SOURCE, out, "--target", "dense", "-q").code == 0
    path = out / "model.safetensors"
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    entry = json.loads(raw[8:8 + n])["model.embed_tokens.weight"]
    last = 8 + n + entry["data_offsets"][1] - 2  # the last bf16 value of the last band
    raw[last] ^= 0x01
    path.write_bytes(bytes(raw))
    r = cli("verify", SOURCE, out)
    assert r.code == 1
    assert "model.embed_tokens.weight" in r.out + r.err
