"""Helpers that make broken copies of a fixture, shared by the bad-input and fuzz tests."""

import json
import shutil
import struct
from pathlib import Path

from conftest import FIXTURES


def copy_fixture(name: str, dest: Path) -> Path:
    shutil.copytree(FIXTURES / name, dest, ignore=shutil.ignore_patterns("reference.safetensors"))
    return dest


def header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_with_header(path: Path, hdr: dict, data: bytes) -> None:
    raw = json.dumps(hdr).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
