import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
INDEX = json.loads((FIXTURES / "index.json").read_text())["fixtures"]
FIXTURE_NAMES = [f["name"] for f in INDEX]
# one source each target writes with default options: the shared test matrices run every target of
# the table on it (a target added to the table without one fails collection)
SAMPLE = {
    "dense": "moe-w4a16",
    "awq": "w4a16-asym-g128",
    "gptq": "w4a16-g128",
    "marlin": "marlin-ok-w4a16",
    "trtllm": "mixed-fp8-w4a16",
    "trtllm-legacy": "w4a16-g128",
    "gguf": "gguf/qwen3moe-w4a16",
    "mlx": "moe-w4a16",
}


def fixture_entry(name: str) -> dict:
    return next(f for f in INDEX if f["name"] == name)


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bit patterns: unlike torch.equal, -0.0 differs from +0.0, NaNs with the
    same payload are equal, and an int32 never equals an int64 holding the same numbers."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        a, b = a.view(_SAME_WIDTH_INT[a.element_size()]), b.view(_SAME_WIDTH_INT[b.element_size()])
    return torch.equal(a, b)


def positive_zeros(t: torch.Tensor) -> torch.Tensor:
    """-0.0 as +0.0: the expectation for a format that cannot store the sign of zero."""
    return torch.where(t == 0, torch.zeros_like(t), t)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the ct-convert entry point in-process, as the console script would."""
    from ct_convert.cli import _state, main

    def run(*args) -> Result:
        monkeypatch.setattr(sys, "argv", ["ct-convert", *map(str, args)])
        _state["debug"] = False
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
