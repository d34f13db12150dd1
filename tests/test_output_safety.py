"""`repack` never removes or changes anything it did not create, however OUTPUT is spelled (issue #16).

Every test snapshots the whole tree around the run and asserts that no byte outside OUTPUT changed.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES


def snapshot(root) -> dict:
    """Every entry below root: file contents' sha256, link targets, folders."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                tree[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                tree[rel] = ("dir",)
            else:
                with open(path, "rb") as f:
                    tree[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
    return tree


@pytest.fixture
def world(tmp_path):
    """A folder holding a source checkpoint and another user's project."""
    src = tmp_path / "models" / "llama"
    shutil.copytree(FIXTURES / "w4a16-g128", src)
    other = tmp_path / "models" / "other-project"
    other.mkdir()
    (other / "notes.txt").write_text("do not lose me")
    return tmp_path, src


def refused(r, *words):
    assert r.code == 2, r.err
    assert r.err.startswith("error: ") and "Traceback" not in r.err
    assert len(r.err.strip().splitlines()) <= 2
    for w in words:
        assert w in r.err, r.err


def test_output_is_source(cli, world):
    root, src = world
    before = snapshot(root)
    refused(cli("repack", src, src, "--target", "dense", "--force"), "is SOURCE")
    refused(cli("repack", src, f"{src}/", "--target", "dense", "--force"), "is SOURCE")
    refused(cli("repack", src, src / ".." / "llama", "--target", "dense", "--force"), "is SOURCE")
    assert snapshot(root) == before


def test_output_holding_source_and_other_projects(cli, world):
    root, src = world
    before = snapshot(root)
    refused(cli("repack", src, root / "models", "--target", "dense", "--force"), "holds SOURCE")
    refused(cli("repack", src, src / "..", "--target", "dense", "--force"), "holds SOURCE")
    assert snapshot(root) == before


def test_output_inside_source(cli, world):
    root, src = world
    before = snapshot(root)
    refused(cli("repack", src, src / "out", "--target", "dense"), "lies inside SOURCE")
    assert snapshot(root) == before


def test_single_file_source_protects_the_file_not_its_folder(cli, world, monkeypatch):
    root, src = world
    monkeypatch.chdir(root)
    before = snapshot(root)
    refused(cli("repack", src / "model.safetensors", src, "--target", "dense", "--force"), "holds SOURCE")
    assert snapshot(root) == before
    # a folder beside the file is a fine OUTPUT for a single-file SOURCE
    monkeypatch.chdir(src)
    assert cli("repack", "model.safetensors", "out", "--target", "dense", "-q").code == 0
    assert (src / "out" / "ct-convert.json").is_file()


@pytest.mark.parametrize("spelling", ["", " ", ".", "./", "sub/..", "sub/../."])
def test_empty_or_current_directory(cli, world, monkeypatch, spelling):
    root, src = world
    work = root / "work"
    (work / "sub").mkdir(parents=True)
    (work / "precious.txt").write_text("keep")
    monkeypatch.chdir(work)
    before = snapshot(root)
    r = cli("repack", src, spelling, "--target", "dense", "--force")
    refused(r, "OUTPUT is empty" if not spelling.strip() else "the current directory")
    assert snapshot(root) == before


def test_root_and_ancestors_of_the_current_directory(cli, world, monkeypatch):
    root, src = world
    monkeypatch.chdir(src)
    before = snapshot(root)
    refused(cli("repack", src, "/", "--target", "dense", "--force"), "OUTPUT is /")
    refused(cli("repack", src, "//", "--target", "dense", "--force"), "OUTPUT is /")
    monkeypatch.chdir(root / "models" / "other-project")
    refused(cli("repack", src / "model.safetensors", root, "--target", "dense", "--force"), "holding the current directory")
    assert snapshot(root) == before


def test_symlinked_source_and_output_spellings(cli, world):
    root, src = world
    alias = root / "alias"
    alias.symlink_to(src)
    before = snapshot(root)
    refused(cli("repack", alias, src, "--target", "dense", "--force"), "is SOURCE")
    refused(cli("repack", src, alias, "--target", "dense", "--force"), "symbolic link")
    refused(cli("repack", alias, alias, "--target", "dense", "--force"), "symbolic link")
    assert snapshot(root) == before


def test_symlinked_output_is_refused_and_nothing_is_left_beside_it(cli, world):
    root, src = world
    target = root / "data"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"\x01" * 100)
    (root / "out").symlink_to(target)
    (root / "dangling").symlink_to(root / "nowhere")
    before = snapshot(root)
    for _ in range(2):
        refused(cli("repack", src, root / "out", "--target", "dense", "--force"), "symbolic link")
        refused(cli("repack", src, root / "dangling", "--target", "dense", "--force"), "symbolic link")
    assert snapshot(root) == before


def test_force_replaces_only_an_earlier_output_or_an_empty_folder(cli, world):
    root, src = world
    out = root / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = snapshot(root)
    refused(cli("repack", src, out, "--target", "dense", "--force"), "not a ct-convert output")
    (out / "ct-convert.json").write_text('{"tool": "something-else", "files": {}}')
    refused(cli("repack", src, out, "--target", "dense", "--force"), "not written by ct-convert")
    (out / "ct-convert.json").unlink()
    assert snapshot(root) == before

    empty = root / "empty"
    empty.mkdir()
    assert cli("repack", src, empty, "--target", "dense", "--force", "-q").code == 0
    assert json.loads((empty / "ct-convert.json").read_text())["target"] == "dense"

    # an earlier output with a file the user added is not replaced: that file would be lost
    (empty / "README.local").write_text("mine")
    before = snapshot(root)
    refused(cli("repack", src, empty, "--target", "awq", "--force"), "README.local", "did not write")
    assert snapshot(root) == before
    (empty / "README.local").unlink()
    assert cli("repack", src, empty, "--target", "awq", "--force", "-q").code == 0
    assert json.loads((empty / "ct-convert.json").read_text())["target"] == "awq"
    assert sorted(p.name for p in root.iterdir()) == ["empty", "models", "out"]


def test_earlier_output_inside_source_is_not_copied_into_a_new_one(cli, world):
    root, src = world
    # made by an older ct-convert that allowed OUTPUT inside SOURCE
    assert cli("repack", src, root / "old", "--target", "dense", "-q").code == 0
    shutil.move(root / "old", src / "old-out")
    before = snapshot(src)
    assert cli("repack", src, root / "new", "--target", "awq", "-q").code == 0
    assert not (root / "new" / "old-out").exists()
    assert "old-out/model.safetensors" not in json.loads((root / "new" / "ct-convert.json").read_text())["files"]
    assert snapshot(src) == before


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_folders_are_matched_by_name_not_as_a_glob(cli, world):
    root, src = world
    pid = _dead_pid()
    own = root / f".out[1].ct-convert-tmp-{pid}"
    other = root / f".out1.ct-convert-tmp-{pid}"
    for d in (own, other):
        d.mkdir()
        (d / "part.safetensors").write_bytes(b"x")
    assert cli("repack", src, root / "out[1]", "--target", "dense", "-q").code == 0
    assert not own.exists()
    assert (other / "part.safetensors").read_bytes() == b"x"


def test_a_running_repack_locks_its_output(cli, world):
    root, src = world
    lock = root / ".out.ct-convert-lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        before = snapshot(root)
        refused(cli("repack", src, root / "out", "--target", "dense"), "another ct-convert run")
        assert snapshot(root) == before
    finally:
        os.close(fd)
    assert cli("repack", src, root / "out", "--target", "dense", "-q").code == 0
    assert not lock.exists()


def test_output_created_by_someone_else_during_the_run_is_not_replaced(cli, world, monkeypatch):
    """The 'already exists' check is made again before the rename, not only at start."""
    import ct_convert.commands.repack as repack_cmd

    root, src = world
    out = root / "out"
    real = repack_cmd._manifest

    def meanwhile(*a, **k):
        out.mkdir()
        (out / "theirs.txt").write_text("other run")
        return real(*a, **k)

    monkeypatch.setattr(repack_cmd, "_manifest", meanwhile)
    refused(cli("repack", src, out, "--target", "dense"), "already exists")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in root.iterdir()) == ["models", "out"]


def test_two_concurrent_runs_never_both_write(world):
    root, src = world
    out = root / "out"
    cmd = [sys.executable, "-m", "ct_convert.cli", "repack", str(src), str(out), "-q", "--target"]
    procs = [subprocess.Popen(cmd + [t], stderr=subprocess.PIPE, text=True) for t in ("dense", "awq")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(err for c, err in results if c == 2)
    assert "already exists" in loser or "another ct-convert run" in loser
    winner = "dense" if results[0][0] == 0 else "awq"
    assert json.loads((out / "ct-convert.json").read_text())["target"] == winner
    assert sorted(p.name for p in root.iterdir()) == ["models", "out"]
