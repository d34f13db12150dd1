"""Malformed input exits 2 with one clear line naming the file or tensor, no traceback, no output."""

import json
import os

import pytest

from badinput import copy_fixture, header, write_with_header


def _repack(cli, src, tmp_path):
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "dense")
    assert r.code == 2, (r.code, r.err)
    assert "Traceback" not in r.err and 1 <= len(r.err.strip().splitlines()) <= 2
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers == []
    return r.err


def test_truncated_shard(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = _repack(cli, src, tmp_path)
    assert "model.safetensors" in err and "truncated" in err


def test_invalid_config_json(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    (src / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    err = _repack(cli, src, tmp_path)
    assert "config.json" in err and "invalid JSON" in err


def test_missing_tensor(cli, tmp_path):
    from safetensors.torch import load_file, save_file

    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, f)
    err = _repack(cli, src, tmp_path)
    assert "model.layers.0.mlp.up_proj.weight_scale" in err and "missing" in err


def test_header_that_does_not_describe_the_data(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, data = header(f)
    del hdr["model.layers.0.mlp.up_proj.weight_scale"]
    write_with_header(f, hdr, data)
    err = _repack(cli, src, tmp_path)
    assert "model.safetensors" in err


def test_shape_mismatch(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, data = header(f)
    entry = hdr["model.layers.0.mlp.up_proj.weight_scale"]
    n, g = entry["shape"]
    entry["shape"] = [g, n]  # same byte count, wrong orientation
    write_with_header(f, hdr, data)
    err = _repack(cli, src, tmp_path)
    assert "up_proj.weight_scale" in err and "shape" in err


def test_byte_count_mismatch(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, data = header(f)
    hdr["model.layers.0.mlp.up_proj.weight_scale"]["shape"][0] += 1
    write_with_header(f, hdr, data)
    err = _repack(cli, src, tmp_path)
    assert "up_proj.weight_scale" in err and "bytes" in err


def test_not_a_compressed_tensors_checkpoint(cli, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (src / "config.json").write_text(json.dumps(cfg))
    err = _repack(cli, src, tmp_path)
    assert "compressed-tensors" in err


def test_missing_source(cli, tmp_path):
    err = _repack(cli, tmp_path / "nope", tmp_path)
    assert "nope" in err


def test_source_is_never_modified(cli, tmp_path):
    src = copy_fixture("w4a16-asym-g128", tmp_path / "src")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    assert cli("repack", src, tmp_path / "out", "--target", "dense", "-q").code == 0
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in src.iterdir()}
    assert before == after


def test_debug_shows_the_traceback(cli, tmp_path):
    with pytest.raises(Exception):
        cli("repack", tmp_path / "nope", tmp_path / "out", "--target", "dense", "--debug")


def test_usage_errors_exit_2(cli, tmp_path):
    r = cli("repack", tmp_path, tmp_path / "o", "--target", "onnx")
    assert r.code == 2
    r = cli("repack", tmp_path, tmp_path / "o", "--target", "dense", "--max-shard-size", "lots")
    assert r.code == 2 and "max-shard-size" in r.err


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_permission_denied_on_output(cli, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        r = cli("repack", copy_fixture("w4a16-g128", tmp_path / "src"), locked / "out", "--target", "dense")
    finally:
        locked.chmod(0o700)
    assert r.code == 2 and "locked" in r.err


def test_a_missing_config_key_is_bad_input_for_every_target_that_needs_it(tmp_path):
    """The same fault is the same error class whichever target meets it."""
    from ct_convert.errors import InputError
    from ct_convert.readers.checkpoint import open_checkpoint
    from ct_convert.source import resolve
    from ct_convert.targets import writer_for
    from ct_convert.targets.writer_base import RepackOptions

    src = copy_fixture("w4a16-g128", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_attention_heads"]
    (src / "config.json").write_text(json.dumps(cfg))
    reader = open_checkpoint(resolve(str(src)))
    for target in ("gguf", "trtllm-legacy"):
        with pytest.raises(InputError, match="num_attention_heads"):
            writer_for(target).plan(reader, RepackOptions(target=target, sm=80))
