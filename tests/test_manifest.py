"""`verify --manifest`: paths that leave OUTPUT, symlinks and unlisted files, a manifest of the wrong
shape, and edits of the manifest itself (its `manifest_sha256`)."""

import hashlib
import json
import os
import shutil

import pytest

from conftest import FIXTURES


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One repack for the module; each test edits its own copy."""
    from ct_convert.commands.repack import repack
    from ct_convert.targets.writer_base import RepackOptions

    out = tmp_path_factory.mktemp("written") / "out"
    repack(str(FIXTURES / "w4a16-g128"), out, RepackOptions(target="dense", device="cpu"), revision=None, force=False,
           show_progress=False)
    return out


@pytest.fixture
def out(written, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(written, dst, symlinks=True)
    return dst


def load(out):
    return json.loads((out / "ct-convert.json").read_text())


def canonical_sha256(manifest: dict) -> str:
    """The documented digest, computed here independently: sorted keys, compact separators, ASCII."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


def rewrite(out, manifest: dict, restamp: bool = True) -> None:
    if restamp:
        manifest["manifest_sha256"] = canonical_sha256(manifest)
    (out / "ct-convert.json").write_text(json.dumps(manifest, indent=2))


def problems(cli, out) -> dict[str, str]:
    r = cli("verify", "--manifest", out, "--json")
    assert r.code == 1 and r.err == ""
    return {p["file"]: p["problem"] for p in r.json()["problems"]}


def test_the_manifest_records_its_own_digest(cli, out):
    m = load(out)
    assert m["manifest_sha256"] == canonical_sha256(m)
    assert cli("verify", "--manifest", out).code == 0


@pytest.mark.parametrize("edit", ["source", "module record", "option", "dropped digest"])
def test_an_edit_of_the_manifest_itself_is_reported(cli, out, edit):
    m = load(out)
    if edit == "source":
        m["source"] = "someone/else"
    elif edit == "module record":
        m["modules"]["model.layers.0.mlp.down_proj"]["verified"]["exact"] = False
    elif edit == "option":
        m["options"]["verify"] = not m["options"].get("verify")
    else:
        del m["manifest_sha256"]
    rewrite(out, m, restamp=False)
    found = problems(cli, out)
    assert list(found) == ["ct-convert.json"]
    assert "manifest_sha256" in found["ct-convert.json"]


@pytest.mark.parametrize("rel", ["../outside.txt", "/etc/hostname", "sub/../../outside.txt", "./config.json", ""])
def test_listed_paths_that_leave_output_are_refused_unread(cli, out, rel):
    outside = out.parent / "outside.txt"
    outside.write_text("not part of the output")
    m = load(out)
    data = outside.read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    rewrite(out, m)
    found = problems(cli, out)
    assert list(found) == [rel] and "not a relative path inside OUTPUT" in found[rel]


def test_unlisted_links_are_reported_and_never_followed(cli, out, tmp_path):
    (out / "weights").symlink_to("/etc")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    (out / "notes").symlink_to(outside / "secret.txt")
    found = problems(cli, out)
    assert found == {
        "weights": "a symbolic link to '/etc', not in the manifest",
        "notes": f"a symbolic link to '{outside / 'secret.txt'}', not in the manifest",
    }


def test_a_listed_file_replaced_by_a_link_is_not_read(cli, out, tmp_path):
    copy = tmp_path / "generation_config.json"
    shutil.copy(out / "generation_config.json", copy)  # same bytes: only the link itself is wrong
    (out / "generation_config.json").unlink()
    (out / "generation_config.json").symlink_to(copy)
    found = problems(cli, out)
    assert found == {"generation_config.json": "is a symbolic link, not a regular file; not read"}


def test_a_listed_file_behind_a_linked_folder_is_not_read(cli, out, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.json").write_text("{}")
    m = load(out)
    m["files"]["sub/a.json"] = {"sha256": hashlib.sha256(b"{}").hexdigest(), "size": 2}
    rewrite(out, m)
    (out / "sub").symlink_to(elsewhere)
    found = problems(cli, out)
    assert found["sub/a.json"] == "lies behind the symbolic link sub; not followed"
    assert found["sub"].startswith("a symbolic link to")


def test_special_files_in_output_are_reported_not_read(cli, out):
    os.mkfifo(out / "pipe")
    assert problems(cli, out) == {"pipe": "a FIFO, not in the manifest"}


@pytest.mark.parametrize("files", [["model.safetensors"], "x", None, 3])
def test_files_of_the_wrong_type_is_one_line(cli, out, files):
    m = load(out)
    m["files"] = files
    rewrite(out, m)
    r = cli("verify", "--manifest", out)
    assert r.code == 2 and "Traceback" not in r.err
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"error: {out / 'ct-convert.json'}: 'files' is ")


@pytest.mark.parametrize("entry", [["abc", 1], {"sha256": "abc"}, {"sha256": 1, "size": 1}, {"sha256": "a", "size": "1"},
                                   {"sha256": "a", "size": True}])
def test_a_file_entry_of_the_wrong_shape_is_one_line(cli, out, entry):
    m = load(out)
    m["files"]["config.json"] = entry
    rewrite(out, m)
    r = cli("verify", "--manifest", out)
    assert r.code == 2
    (line,) = r.err.strip().splitlines()
    assert "files['config.json'] is not an object with a string sha256 and an integer size" in line


@pytest.mark.parametrize("raw", [b"[]", b"{", b"\xff\xfe", b'{"files": {}}' + b"x"])
def test_an_unreadable_manifest_is_one_line(cli, out, raw):
    (out / "ct-convert.json").write_bytes(raw)
    r = cli("verify", "--manifest", out)
    assert r.code == 2 and "Traceback" not in r.err
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"error: {out / 'ct-convert.json'}: ")


def test_a_linked_manifest_is_refused(cli, out, tmp_path):
    shutil.move(out / "ct-convert.json", tmp_path / "m.json")
    (out / "ct-convert.json").symlink_to(tmp_path / "m.json")
    r = cli("verify", "--manifest", out)
    assert r.code == 2 and "is a symbolic link" in r.err
