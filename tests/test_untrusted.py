"""Untrusted names and special files: text from a checkpoint or the command line is printed as the
characters it holds (never as rich markup, never as raw control characters), only regular files are
read or copied, a closed stdout pipe or a low open-file limit does not turn a finished run into a
failure, and an unexpected error still names the file and how to report it. Each failure: exit 2,
one or two lines on stderr, no traceback, nothing left behind."""

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from badinput import copy_fixture, header, write_with_header
from conftest import FIXTURES

FIXTURE = FIXTURES / "w4a16-g128"


def error_lines(err: str) -> list[str]:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and 1 <= len(lines) <= 2, err
    assert lines[0].startswith("error: "), err
    return lines


def assert_plain_text(text: str) -> None:
    """Nothing a terminal would act on: no escape, no carriage return, no other C0/C1 control but newline."""
    assert not [c for c in text if c != "\n" and not c.isprintable() and c != " "], repr(text)


def rename_tensors(src: Path, old: str, new: str) -> None:
    f = src / "model.safetensors"
    hdr, blob = header(f)
    hdr = {(k.replace(old, new) if k.startswith(old) else k): v for k, v in hdr.items()}
    write_with_header(f, hdr, blob)


@pytest.fixture
def hang_guard():
    """Unblocks a reader stuck opening a FIFO (by opening its write end), so a regression fails the
    test instead of hanging the suite."""
    fifos, stop = [], threading.Event()

    def watch():
        while not stop.wait(0.2):
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads
                except OSError:
                    pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    yield fifos.append
    stop.set()


# -- markup and control characters ------------------------------------------------------------------

def test_output_path_with_markup_is_printed_literally(cli, tmp_path):
    (tmp_path / "out[").mkdir()
    out = tmp_path / "out[" / "x]"  # OUTPUT spelled `out[/x]`: a closing tag to rich
    r = cli("repack", FIXTURE, out, "--target", "dense")
    assert r.code == 0, r.err
    assert f"wrote {out} (dense)" in r.out and r.err == ""
    r = cli("verify", "--manifest", out)
    assert r.code == 0 and "every file matches" in r.out


def test_tensor_name_with_markup_in_an_error(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, blob = header(f)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    hdr[name + "[/x][bold]"] = dict(hdr.pop(name), dtype="X9")
    write_with_header(f, hdr, blob)
    r = cli("repack", src, tmp_path / "out", "--target", "dense")
    assert r.code == 2
    (line,) = error_lines(r.err)
    assert "weight_scale[/x][bold]" in line and "unsupported dtype" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_module_name_with_newline_and_escape_is_shown_escaped(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    rename_tensors(src, "model.layers.0.mlp.down_proj.", "model.layers.0.mlp.down\n\x1b[31mproj.")
    r = cli("inspect", src, "--modules")
    assert r.code == 0, r.err
    assert_plain_text(r.out)
    assert "down\\n\\x1b[31mproj" in r.out
    # --json keeps the real name (JSON escapes it) for programs
    names = [m["name"] for m in cli("inspect", src, "--json").json()["modules"]]
    assert "model.layers.0.mlp.down\n\x1b[31mproj" in names


def test_control_characters_in_a_path_are_escaped_in_errors(cli, tmp_path):
    bad = tmp_path / "no\nsuch\x1b[2J\u202e[/x]"
    r = cli("inspect", bad)
    assert r.code == 2
    (line,) = error_lines(r.err)
    assert_plain_text(r.err)
    assert "no\\nsuch\\x1b[2J\\u202e[/x]" in line


def test_usage_error_is_one_line(cli):
    r = cli("repack", "a", "b", "--target", "\x1b[31mnope")
    assert r.code == 2
    lines = error_lines(r.err)
    assert_plain_text(r.err)
    assert "nope" in lines[0] and "--help" in lines[1]


# -- special files -------------------------------------------------------------------------------

def test_fifo_weights_are_refused_not_waited_for(cli, tmp_path, hang_guard):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    hang_guard(src / "model.safetensors")
    for args in (["inspect", src], ["repack", src, tmp_path / "out", "--target", "dense"]):
        r = cli(*args)
        assert r.code == 2
        (line,) = error_lines(r.err)
        assert f"{src / 'model.safetensors'}: is a FIFO (named pipe), not a regular file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_fifo_given_as_source_file(cli, tmp_path, hang_guard):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    hang_guard(fifo)
    r = cli("inspect", fifo)
    assert r.code == 2 and "is a FIFO" in error_lines(r.err)[0]


@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "sub/notes.txt"])
def test_fifo_beside_the_weights_is_refused(cli, tmp_path, hang_guard, name):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    (src / name).parent.mkdir(exist_ok=True)
    (src / name).unlink(missing_ok=True)
    os.mkfifo(src / name)
    hang_guard(src / name)
    r = cli("repack", src, tmp_path / "out", "--target", "dense")
    assert r.code == 2
    (line,) = error_lines(r.err)
    assert f"{src / name}: is a FIFO" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_character_device_beside_the_weights_is_refused(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    try:  # the null device (1, 3): the same file type as /dev/zero, and harmless if it were copied
        os.mknod(src / "tokenizer.json", 0o600 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    r = cli("repack", src, tmp_path / "out", "--target", "dense")
    assert r.code == 2
    assert f"{src / 'tokenizer.json'}: is a character device" in error_lines(r.err)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_gguf_tokenizer_files_must_be_regular(cli, tmp_path, hang_guard):
    src = copy_fixture("gguf/qwen3moe-w4a16", tmp_path / "src")
    assert (src / "tokenizer.json").is_file()
    (src / "tokenizer_config.json").unlink(missing_ok=True)
    os.mkfifo(src / "tokenizer_config.json")  # gguf.SpecialVocab would skip it and drop the chat template
    hang_guard(src / "tokenizer_config.json")
    r = cli("repack", src, tmp_path / "out", "--target", "gguf")
    assert r.code == 2
    assert f"{src / 'tokenizer_config.json'}: is a FIFO" in error_lines(r.err)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_vocab_from_must_be_a_regular_file(cli, tmp_path, hang_guard):
    fifo = tmp_path / "official.gguf"
    os.mkfifo(fifo)
    hang_guard(fifo)  # gguf-py maps the file: opening a FIFO would block
    r = cli("repack", FIXTURES / "gguf" / "qwen3moe-w4a16", tmp_path / "out", "--target", "gguf", "--vocab-from", fifo)
    assert r.code == 2
    assert f"{fifo}: is a FIFO" in error_lines(r.err)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.gguf"]


def test_copy_with_hash_refuses_what_is_not_a_regular_file(tmp_path, hang_guard):
    from ct_convert.errors import InputError
    from ct_convert.output import copy_with_hash

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    hang_guard(fifo)
    for special in (fifo, Path("/dev/null"), tmp_path):
        with pytest.raises(InputError, match="not a regular file"):
            copy_with_hash(special, tmp_path / "copy")
        assert not (tmp_path / "copy").exists()


def test_a_shard_replaced_after_its_header_was_read_is_refused(tmp_path):
    from ct_convert.errors import InputError
    from ct_convert.source import resolve

    src = copy_fixture("w4a16-g128", tmp_path / "src")
    store = resolve(str(src)).store
    f = src / "model.safetensors"
    replacement = tmp_path / "replacement"
    shutil.copy(f, replacement)
    os.replace(replacement, f)  # same bytes, another file
    with pytest.raises(InputError, match="model.safetensors: replaced or resized since its header was read"):
        store.get("model.layers.0.mlp.up_proj.weight_scale")


# -- stdout pipe, open-file limit, unexpected errors ----------------------------------------------

def run_into_closed_pipe(*args) -> subprocess.CompletedProcess:
    """Run with stdout a pipe whose reader has gone (`… | head -c0`)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "ct_convert.cli", *map(str, args)], stdout=w,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)


def test_closed_stdout_pipe_after_the_output_is_committed(cli, tmp_path):
    out = tmp_path / "out"
    p = run_into_closed_pipe("repack", FIXTURE, out, "--target", "dense", "--json")
    assert p.returncode == 0 and p.stderr == ""
    assert cli("verify", "--manifest", out).code == 0
    p = run_into_closed_pipe("inspect", FIXTURE, "--modules")
    assert p.returncode == 0 and p.stderr == ""


def reshard_one_tensor_per_file(src: Path) -> int:
    tensors = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, name in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file({name: tensors[name]}, src / fname, metadata={"format": "pt"})
        weight_map[name] = fname
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return len(names)


def test_many_shards_under_a_low_open_file_limit(cli, tmp_path):
    """27 shards, 20 descriptors allowed: the shards are opened per read, not held open together."""
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    assert reshard_one_tensor_per_file(src) > 20
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "ct_convert.cli", "repack", src, out, "--target", "dense", "--workers", "2"],
                       capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20, 20)))
    assert p.returncode == 0, p.stderr
    assert cli("verify", src, out, "-q").code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_running_out_of_descriptors_mid_run_leaves_nothing(cli, tmp_path, monkeypatch):
    import ct_convert.tensorstore as ts

    real, calls = ts.open_regular, {"n": 0}

    def emfile_after_a_few(path):
        calls["n"] += 1
        if calls["n"] > 12:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path)

    monkeypatch.setattr(ts, "open_regular", emfile_after_a_few)
    r = cli("repack", FIXTURE, tmp_path / "out", "--target", "dense")
    assert r.code == 2
    (line,) = error_lines(r.err)
    assert "model.safetensors: cannot read tensor" in line and "Too many open files" in line
    assert list(tmp_path.iterdir()) == []


def test_unexpected_error_names_the_file_and_how_to_report_it(cli, tmp_path, monkeypatch):
    from ct_convert.targets.dense.writer import Writer as DenseWriter

    def bug(self, qw, opts):
        raise ZeroDivisionError("a bug\nspanning lines")

    monkeypatch.setattr(DenseWriter, "convert", bug)
    out = tmp_path / "out"
    r = cli("repack", FIXTURE, out, "--target", "dense")
    assert r.code == 2
    first, second = error_lines(r.err)
    assert first.startswith("error: unexpected ZeroDivisionError: a bug\\nspanning lines (while reading ")
    assert str(FIXTURE / "model.safetensors") in first
    assert f"ct-convert repack {FIXTURE} {out} --target dense --debug" in second
    assert list(tmp_path.iterdir()) == []
