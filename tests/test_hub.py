"""Repo ids resolved through huggingface_hub against a real cache folder laid out as the library lays it out."""

import hashlib
import json
import os
import subprocess
import sys

from conftest import FIXTURES

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_cache(home, repo="acme/tiny-w4a16", fixture="w4a16-sharded", ref="main"):
    """HF_HOME/hub/models--acme--tiny-w4a16/{blobs,refs,snapshots} with symlinked snapshot files."""
    repo_dir = home / "hub" / ("models--" + repo.replace("/", "--"))
    blobs, snap = repo_dir / "blobs", repo_dir / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted((FIXTURES / fixture).iterdir()):
        if f.name == "reference.safetensors":
            continue
        data = f.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / ref).write_text(COMMIT)
    return repo_dir


def run(args, home, offline=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(home)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-m", "ct_convert.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def test_inspect_and_repack_a_cached_repo_offline(tmp_path):
    home = tmp_path / "hf"
    make_cache(home)
    r = run(["inspect", "acme/tiny-w4a16", "--json"], home)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"] == "acme/tiny-w4a16" and len(doc["modules"]) == 7
    out = tmp_path / "out"
    r = run(["repack", "acme/tiny-w4a16", out, "--target", "dense", "--json"], home)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "ct-convert.json").read_text())
    assert manifest["source"] == "acme/tiny-w4a16" and manifest["revision"] == COMMIT
    # the snapshot's symlinks are followed, but the copies in OUTPUT are plain files
    assert not any(p.is_symlink() for p in out.iterdir())


def test_revision_is_honoured(tmp_path):
    home = tmp_path / "hf"
    make_cache(home, ref="v1")
    assert run(["inspect", "acme/tiny-w4a16", "--revision", "v1", "--json"], home).returncode == 0
    r = run(["inspect", "acme/tiny-w4a16", "--revision", "v2"], home)
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr and "Traceback" not in r.stderr


def test_uncached_repo_offline_is_a_clear_error(tmp_path):
    r = run(["inspect", "acme/not-here"], tmp_path / "empty")
    assert r.returncode == 2
    assert "acme/not-here" in r.stderr and "not in the Hugging Face cache" in r.stderr


def test_a_cache_symlink_that_leaves_the_repo_is_refused(tmp_path):
    home = tmp_path / "hf"
    repo_dir = make_cache(home)
    secret = tmp_path / "elsewhere.safetensors"
    secret.write_bytes((FIXTURES / "w4a16-g128" / "model.safetensors").read_bytes())
    snap = repo_dir / "snapshots" / COMMIT
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (snap / first).unlink()
    os.symlink(secret, snap / first)
    r = run(["inspect", "acme/tiny-w4a16"], home)
    assert r.returncode == 2 and "leaves the checkpoint folder" in r.stderr
