"""Hostile input that used to exhaust memory or time, or was converted silently wrong (issue 16).

Each case goes through the CLI entry point and must end in one line naming the file, field or tensor
(exit 2), leave no output behind, and finish quickly. Large inputs are built on the fly; where the
real thing would take gigabytes (a bitmask expanding past the memory left), the limit is lowered
instead of the input grown.
"""

import json
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from badinput import copy_fixture, header, write_with_header
from conftest import FIXTURES

SECONDS = 20  # every case here finishes in a few seconds on one loaded core


class Hung(BaseException):
    """Raised by the alarm: not an Exception, so the CLI's catch-all cannot swallow it."""


@pytest.fixture
def refused(cli, tmp_path):
    """Run repack and assert a clean refusal: exit 2, one error line (plus a hint) naming every
    string in `names`, no traceback, nothing left beside OUTPUT, within SECONDS."""

    def run(src, *opts, names=(), target="dense"):
        out = tmp_path / "out"

        def alarm(*_):
            raise Hung(f"no exit within {3 * SECONDS} s")

        previous = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(3 * SECONDS)
        start = time.monotonic()
        try:
            r = cli("repack", src, out, "--target", target, *opts)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        elapsed = time.monotonic() - start
        lines = r.err.strip().splitlines()
        assert r.code == 2, (r.code, r.err)
        assert lines and lines[0].startswith("error:") and len(lines) <= 2, r.err
        assert "Traceback" not in r.err and "unexpected" not in r.err, r.err
        for name in names:
            assert name in lines[0], (name, lines[0])
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
        assert elapsed < SECONDS, f"took {elapsed:.1f} s"
        return lines[0]

    return run


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))
    return cfg


# -- sparse-bitmask bombs ----------------------------------------------------------------------------

SPARSE = "legacy-0.14-sparse-bitmask"
BOMBED = "model.layers.0.mlp.down_proj"


def _sparse_bomb(tmp_path, rows: int, cols: int, fill: int, stored: int):
    """The fixture with one module replaced by a bitmask of `fill` bytes claiming a rows x cols module."""
    src = copy_fixture(SPARSE, tmp_path / "src")
    f = src / "model.safetensors"
    t = load_file(f)
    t[f"{BOMBED}.shape"] = torch.tensor([rows, cols])
    t[f"{BOMBED}.bitmask"] = torch.full((rows, (cols + 7) // 8), fill, dtype=torch.uint8)
    t[f"{BOMBED}.compressed"] = torch.ones(stored, dtype=torch.bfloat16)
    t[f"{BOMBED}.row_offsets"] = torch.zeros(rows, dtype=torch.int64)
    save_file(t, f)
    return src


def test_sparse_bitmask_claiming_more_values_than_stored(refused, tmp_path):
    # every bit set over 32M positions, 16 values stored: counted in bands before any expansion
    src = _sparse_bomb(tmp_path, 4096, 8192, 0xFF, 16)
    msg = refused(src, names=[f"{BOMBED}.compressed"])
    assert "holds 16 values but its bitmask keeps 33554432" in msg


def test_sparse_bitmask_expanding_past_the_memory_left(refused, tmp_path, monkeypatch):
    # an all-zero bitmask is consistent with no stored values, but expands to a 64 MB module; the
    # memory left is lowered to 32 MB rather than the bitmask grown to gigabytes
    src = _sparse_bomb(tmp_path, 4096, 8192, 0, 0)
    monkeypatch.setattr("ct_convert.memory.available_bytes", lambda: 32 << 20)
    msg = refused(src, names=[f"{BOMBED}.bitmask"])
    assert "67108864 bytes" in msg and "memory" in msg


def test_sparse_expansion_in_bands_matches_the_library(monkeypatch):
    """Bands of two rows give the bit patterns the writing library's own decompression gave."""
    from ct_convert.readers import sparse
    from ct_convert.readers.checkpoint import open_checkpoint
    from ct_convert.source import resolve

    ref = load_file(FIXTURES / SPARSE / "reference.safetensors")
    reader = open_checkpoint(resolve(str(FIXTURES / SPARSE)))
    for module in sorted(k.removesuffix(".weight") for k in ref):
        cols = reader.modules[module].shape[-1]
        monkeypatch.setattr(sparse, "BAND_ELEMENTS", 2 * cols)
        got = reader.read(module).dequantize(ref[f"{module}.weight"].dtype)
        assert torch.equal(got.view(torch.int16), ref[f"{module}.weight"].view(torch.int16)), module


# -- oversized headers and indexes -------------------------------------------------------------------

def test_header_of_a_million_tiny_tensors(refused, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, data = header(f)
    n = 10**6
    extra = ",".join(f'"model.extra.{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{len(data) + i},{len(data) + i + 1}]}}'
                     for i in range(n))
    raw = (json.dumps(hdr)[:-1] + "," + extra + "}").encode()
    raw += b" " * (-len(raw) % 8)
    assert len(raw) > 70_000_000
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data + bytes(n))
    msg = refused(src, names=["model.safetensors"])
    assert "more tensors than the 524288" in msg


def test_header_count_also_bounds_a_header_that_escapes_its_keys(tmp_path):
    """Keys spelled with escapes escape the byte count; parsing still stops at the limit."""
    from ct_convert.errors import InputError
    from ct_convert.tensorstore import read_header

    f = tmp_path / "model.safetensors"
    entries = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data\\u005foffsets":[{i},{i + 1}]}}' for i in range(3000))
    raw = ("{" + entries + "}").encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(3000))
    assert len(read_header(f, max_tensors=3000)[0]) == 3000
    with pytest.raises(InputError, match="more tensors than"):
        read_header(f, max_tensors=2999)


def _index_with(src, entries: str):
    idx = src / "model.safetensors.index.json"
    text = idx.read_text().rstrip()
    body = json.loads(text)
    shard = sorted(set(body["weight_map"].values()))[0]
    wm = json.dumps(body["weight_map"])[:-1]
    idx.write_text(json.dumps({"metadata": body.get("metadata", {})})[:-1]
                   + f', "weight_map": {wm}, {entries.replace("SHARD", shard)}}}}}')
    return idx


def test_index_of_a_million_entries(refused, tmp_path):
    src = copy_fixture("w4a16-sharded", tmp_path / "src")
    _index_with(src, ",".join(f'"model.extra.{i}": "SHARD"' for i in range(10**6)))
    msg = refused(src, names=["model.safetensors.index.json"])
    assert "1000" in msg and "524288" in msg


def test_index_entries_are_checked_once_per_shard(refused, tmp_path):
    """2x10^5 entries under the limit: each shard's path is resolved once, not once per entry."""
    src = copy_fixture("w4a16-sharded", tmp_path / "src")
    _index_with(src, ",".join(f'"model.extra.{i}": "SHARD"' for i in range(200_000)))
    refused(src, names=["model.extra.", "the index lists"])


def test_index_entry_with_a_name_too_long_for_the_file_system(refused, tmp_path):
    src = copy_fixture("w4a16-sharded", tmp_path / "src")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    name = sorted(idx["weight_map"])[0]
    idx["weight_map"][name] = "a" * 300 + ".safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    refused(src, names=["model.safetensors.index.json", name])


# -- JSON nested too deeply --------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def test_config_nested_100000_levels(refused, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    text = (src / "config.json").read_text().rstrip()
    (src / "config.json").write_text(text[:-1] + f', "x": {DEEP}}}')
    assert "nested" in refused(src, names=["config.json"])


def test_config_nested_past_the_depth_limit_but_parseable(refused, tmp_path):
    # 100 levels parse, but a later json.dumps of the config from a deeper stack could fail
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    _edit_config(src, x=json.loads("[" * 100 + "]" * 100))
    assert "more than 64 levels" in refused(src, names=["config.json"])


def test_safetensors_header_nested_100000_levels(refused, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    hdr, data = header(f)
    raw = (json.dumps(hdr)[:-1] + f', "x": {DEEP}}}').encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    assert "nested" in refused(src, names=["model.safetensors"])


def test_index_nested_100000_levels(refused, tmp_path):
    src = copy_fixture("w4a16-sharded", tmp_path / "src")
    _index_with(src, f'"x": {DEEP}')
    assert "nested" in refused(src, names=["model.safetensors.index.json"])


# -- header entries no tensor can have ---------------------------------------------------------------

def _add_empty_entry(src, name: str, shape):
    f = src / "model.safetensors"
    hdr, data = header(f)
    hdr[name] = {"dtype": "U8", "shape": shape, "data_offsets": [len(data), len(data)]}
    write_with_header(f, hdr, data)


def test_shape_that_overflows_int64_with_no_bytes(refused, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    _add_empty_entry(src, "model.huge", [2**64, 0])
    refused(src, names=["model.safetensors", "model.huge", "invalid shape"])


def test_tensor_name_with_a_lone_surrogate(refused, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    _add_empty_entry(src, "model.\ud800", [0])
    assert "surrogate" in refused(src, names=["model.safetensors"])


# -- untrusted re: patterns --------------------------------------------------------------------------

def _quant_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("count, says", [(10**6, "1000000 entries"), (2000, "2000 re: patterns")])
def test_a_million_ignore_patterns(refused, tmp_path, count, says):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    _quant_config(src, ignore=[f"re:x{i}" for i in range(count)])
    assert says in refused(src, names=["config.json", "ignore"])


def test_pattern_whose_counted_repetitions_multiply(refused, tmp_path):
    # compiling ((a{100}){100}){100} builds 10^6 copies: refused by the pattern's text alone
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    _quant_config(src, ignore=["re:((a{100}){100}){100}"])
    refused(src, names=["config.json", "ignore", "((a{100}){100}){100}"])


def _catastrophic_source(tmp_path, pattern: str, a_count: int):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    t = load_file(f)
    t["a" * a_count + "!.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(t, f)
    _quant_config(src, ignore=["lm_head", f"re:{pattern}"])
    return src


def test_nested_quantifier_from_the_issue_finishes(cli, tmp_path):
    """`(a+)+$` against 34 a's and '!': the matcher needs no backtracking storm, so the module is
    simply not ignored and the conversion succeeds quickly."""
    src = _catastrophic_source(tmp_path, "(a+)+$", 34)
    start = time.monotonic()
    r = cli("repack", src, tmp_path / "out", "--target", "dense")
    assert r.code == 0, r.err
    assert time.monotonic() - start < SECONDS


def test_catastrophic_backtracking_is_cut_off(tmp_path):
    """`(a|aa)+$` does backtrack exponentially; the match budget (lowered to 1 s) ends it with a
    refusal naming the pattern. Run in a subprocess, so that a regression cannot hang the suite."""
    src = _catastrophic_source(tmp_path, "(a|aa)+$", 60)
    out = tmp_path / "out"
    code = (
        "import sys; import ct_convert.readers.matching as m; m.MATCH_SECONDS = 1.0; "
        "from ct_convert.cli import main; sys.argv = ['ct-convert'] + sys.argv[1:]; main()"
    )
    r = subprocess.run([sys.executable, "-c", code, "repack", str(src), str(out), "--target", "dense"],
                       capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert "config.json" in lines[0] and "(a|aa)+$" in lines[0] and "backtracking" in lines[0]
    assert "Traceback" not in r.stderr and len(lines) <= 2 and not out.exists()


# -- GGUF: config sizes against the tensors ------------------------------------------------------------

@pytest.mark.parametrize(
    "fixture, changes, field",
    [
        ("w4a16-g128", {"num_hidden_layers": 10**7}, "num_hidden_layers"),
        ("gguf/qwen3moe-w4a16", {"num_local_experts": 10**9}, "num_local_experts"),
        ("w4a16-g128", {"head_dim": 2**31, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "head_dim"),
        ("w4a16-g128", {"max_position_embeddings": "1e400"}, "max_position_embeddings"),
        ("w4a16-g128", {"rms_norm_eps": "abc"}, "rms_norm_eps"),
        ("w4a16-g128", {"num_attention_heads": 3}, "num_attention_heads"),
        ("w4a16-g128", {"rope_scaling": "llama3"}, "rope_scaling"),
    ],
)
def test_gguf_config_sizes_checked_against_the_tensors(refused, tmp_path, fixture, changes, field):
    src = copy_fixture(fixture, tmp_path / "src")
    cfg = _edit_config(src, **changes)
    # json reads 1e400 as inf, which json.dumps would write as Infinity: write the text itself
    (src / "config.json").write_text(json.dumps(cfg).replace('"1e400"', "1e400"))
    refused(src, names=["config.json", field], target="gguf")


@pytest.mark.parametrize("field, text", [("max_position_embeddings", "1e400"), ("rms_norm_eps", '"abc"')])
def test_trtllm_config_numbers(refused, tmp_path, field, text):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    cfg = _edit_config(src, **{field: 0})
    (src / "config.json").write_text(json.dumps(cfg).replace(f'"{field}": 0', f'"{field}": {text}'))
    refused(src, names=["config.json", field], target="trtllm-legacy")


def test_gguf_truncated_tokenizer_config(refused, tmp_path):
    src = copy_fixture("gguf/qwen3moe-w4a16", tmp_path / "src")
    f = src / "tokenizer_config.json"
    f.write_text(f.read_text()[:40])
    refused(src, names=["tokenizer_config.json", "invalid JSON"], target="gguf")


def test_gguf_tokenizer_json_over_the_json_limit_is_refused_unread(refused, tmp_path):
    """A 200 MB tokenizer.json once peaked at 3.3 GB: files over the JSON limit are refused from
    their size (a sparse file here: nothing of it is read)."""
    src = copy_fixture("gguf/qwen3moe-w4a16", tmp_path / "src")
    with open(src / "tokenizer.json", "r+b") as f:
        f.truncate(200_000_000)
    refused(src, names=["tokenizer.json", "limit"], target="gguf")


def _gguf(path, n_kv: int, arrays: bytes = b""):
    def s(text):
        return struct.pack("<Q", len(text)) + text.encode()

    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + s("tokenizer.ggml.model") + struct.pack("<I", 8) + s("gpt2") + arrays
    path.write_bytes(raw.ljust(100, b"\0"))
    return path


@pytest.mark.parametrize("claim, field", [
    ("kv", "metadata_kv_count"),
    ("tokens", "tokenizer.ggml.tokens"),
])
def test_vocab_from_gguf_claiming_more_than_it_holds(refused, tmp_path, claim, field):
    if claim == "kv":
        vocab = _gguf(tmp_path / "v.gguf", 2**40)
    else:
        tokens = struct.pack("<Q", 21) + b"tokenizer.ggml.tokens" + struct.pack("<IIQ", 9, 8, 2**62)
        vocab = _gguf(tmp_path / "v.gguf", 2, tokens)
    refused(FIXTURES / "w4a16-g128", "--vocab-from", vocab, names=["v.gguf", field], target="gguf")


def test_max_shard_size_inf(refused):
    refused(FIXTURES / "w4a16-g128", "--max-shard-size", "inf", names=["--max-shard-size", "inf"])


# -- contradictions that used to convert silently wrong ----------------------------------------------

def test_symmetric_config_with_real_zero_points(refused, tmp_path):
    src = copy_fixture("w4a16-asym-g128", tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    for group in cfg["quantization_config"]["config_groups"].values():
        group["weights"]["symmetric"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    msg = refused(src, names=["weight_zero_point", "symmetric"])
    assert msg.startswith("error: tensor model.layers.0.")


def test_symmetric_config_with_all_zero_zero_points_is_read_as_without_them(tmp_path):
    """4-bit zero points of 0 are stored as the unsigned nibble 8: packed words 0x88888888. Such a
    module reads exactly as the same module without zero points."""
    from ct_convert.readers.checkpoint import open_checkpoint
    from ct_convert.source import resolve

    module = "model.layers.0.mlp.down_proj"
    with_zp = copy_fixture("w4a16-g128", tmp_path / "with")
    t = load_file(with_zp / "model.safetensors")
    groups = t[f"{module}.weight_scale"].shape[-1]
    rows = t[f"{module}.weight_scale"].shape[0] // 8
    t[f"{module}.weight_zero_point"] = torch.full((rows, groups), 0x88888888 - 2**32, dtype=torch.int32)
    save_file(t, with_zp / "model.safetensors")
    got = open_checkpoint(resolve(str(with_zp))).read(module).dequantize(torch.bfloat16)
    want = open_checkpoint(resolve(str(FIXTURES / "w4a16-g128"))).read(module).dequantize(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_integer_weight_scale(refused, tmp_path):
    src = copy_fixture("w4a16-g128", tmp_path / "src")
    f = src / "model.safetensors"
    t = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    t[name] = t[name].float().mul(1000).to(torch.int32)
    save_file(t, f)
    assert "dtype I32" in refused(src, names=[name])
