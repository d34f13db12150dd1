"""Interrupted runs (SIGINT, SIGTERM, SIGKILL mid-write) leave no OUTPUT, and a re-run succeeds."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from synth import build  # noqa: E402


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    # large enough that a dense repack takes seconds: the signal lands mid-write
    return build(tmp_path_factory.mktemp("synth") / "src", layers=6, hidden=2048, intermediate=5632,
                 heads=16, kv_heads=4, vocab=8000, shard_bytes=60_000_000)


def start(src, out):
    return subprocess.Popen(
        [sys.executable, "-m", "ct_convert.cli", "repack", str(src), str(out), "--target", "dense", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_partial_output(parent: Path, proc, timeout=120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in parent.glob(".out.ct-convert-tmp-*"):
            if any(tmp.glob("*.safetensors")):
                return tmp
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("no partial output appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_leaves_nothing(big_source, tmp_path, sig):
    out = tmp_path / "out"
    proc = start(big_source, out)
    wait_for_partial_output(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_kill_mid_write_is_cleaned_by_the_next_run(big_source, tmp_path):
    out = tmp_path / "out"
    proc = start(big_source, out)
    stale = wait_for_partial_output(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert stale.exists() and not out.exists()
    rerun = subprocess.run([sys.executable, "-m", "ct_convert.cli", "repack", str(big_source), str(out), "--target", "dense", "-q", "--no-verify"],
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert out.is_dir() and not stale.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
