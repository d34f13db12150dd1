"""Disk full and permission denied while writing OUTPUT: a clear error, exit 2, nothing left behind."""

import errno

import pytest

from conftest import FIXTURES


@pytest.mark.parametrize("fixture,target", [("w4a16-g128", "dense"), ("gguf/qwen3moe-w4a16", "gguf"), ("moe-w4a16", "mlx")])
def test_disk_full_mid_write(cli, tmp_path, monkeypatch, fixture, target):
    from ct_convert.sink import HashingSink

    calls = {"n": 0}
    real = HashingSink._write

    def fill_up(self, data):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(HashingSink, "_write", fill_up)
    monkeypatch.setattr("ct_convert.sink.GATHER_BYTES", 1)  # every piece its own write, as large tensors are
    r = cli("repack", FIXTURES / fixture, tmp_path / "out", "--target", target)
    assert r.code == 2 and "disk full" in r.err and str(tmp_path / "out") in r.err
    assert calls["n"] > 3
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_copying_other_files(cli, tmp_path, monkeypatch):
    import ct_convert.output as output

    def no_space(src, dst):
        raise output.OutputError(f"{dst}: disk full while copying {src.name}")

    monkeypatch.setattr("ct_convert.targets.writer_base.copy_with_hash", no_space)
    r = cli("repack", FIXTURES / "w4a16-g128", tmp_path / "out", "--target", "dense")
    assert r.code == 2 and "disk full" in r.err
    assert list(tmp_path.iterdir()) == []


def test_permission_denied_creating_output(cli, tmp_path, monkeypatch):
    from pathlib import Path

    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if ".ct-convert-tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    r = cli("repack", FIXTURES / "w4a16-g128", tmp_path / "out", "--target", "dense")
    assert r.code == 2 and "cannot create the output folder" in r.err and "Permission denied" in r.err
    assert list(tmp_path.iterdir()) == []


def test_enospc_from_anywhere_inside_the_transaction_is_reported_as_disk_full(tmp_path):
    import pytest

    from ct_convert.errors import OutputError
    from ct_convert.output import OutputFolder

    with pytest.raises(OutputError, match="disk full"):
        with OutputFolder(tmp_path / "out", force=False):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
