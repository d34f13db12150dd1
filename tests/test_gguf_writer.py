"""`--target gguf` on the fixtures: every tensor read back with gguf-py's reader and dequantizers,
mapped to HF names here (independently of the writer), compared with the compressed-tensors
library's own decompression (reference.safetensors) and with the exact float32 value."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, equal_bits, positive_zeros
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve

MOE = FIXTURES / "gguf" / "qwen3moe-w4a16"
LAYER = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip

# float codes with a negative zero, which ggml's integer block values (Q8_0, the E2M1 table) hold as +0
SIGNLESS_ZERO = {"mxfp4a16", "mxfp6a16", "nvfp4a16"}
CASES = {  # fixture -> (extra options, GGUF type of every quantized module)
    "w4a16-g128": ((), "Q4_0"),
    "w3a16-g128": ((), "Q4_0"),
    "w2a16-g128": ((), "Q4_0"),
    "w4a16-channel": ((), "Q4_0"),
    "w4a16-asym-g128": ((), "Q5_0"),
    "w4a16-asym-channel": ((), "Q5_0"),
    "w8a16-g128": ((), "Q8_0"),
    "w8a8-int": ((), "Q8_0"),
    "mxfp4a16": ((), "MXFP4"),
    "mxfp6a16": ((), "Q8_0"),
    "nvfp4a16": (("--nvfp4",), "NVFP4"),
    "fp8-dynamic": ((), "BF16"),
    "mxfp8a16": ((), "BF16"),
}


def gguf_tensor_name(module: str) -> tuple[str, int | None]:
    """HF module -> (GGUF tensor, expert index), written out by hand for the fixtures' names."""
    parts = module.split(".")
    layer, leaf = parts[2], parts[-1]
    if "experts" in parts:
        return f"blk.{layer}.{LAYER[leaf]}_exps.weight", int(parts[-2])
    return f"blk.{layer}.{LAYER[leaf]}.weight", None


def hf_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K order: stored [head, i, pair] -> HF [head, pair, i]."""
    n, k = w.shape
    return w.reshape(n_head, -1, 2, k).transpose(1, 2).reshape(n, k)


def read_back(path):
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    fields = {k: f.contents() for k, f in r.fields.items()}
    return tensors, fields


def value(t, expert=None) -> torch.Tensor:
    data = t.data if expert is None else t.data[expert]
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    if qtype == gguf.GGMLQuantizationType.BF16:
        bits = np.array(data).view(np.uint16).astype(np.uint32) << 16
        return torch.from_numpy(bits.view(np.float32)).reshape(data.shape[:-1] + (-1,)).reshape(-1, data.shape[-1] // 2)
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype)))


def repack(cli, src, out, *opts):
    r = cli("repack", src, out, "--target", "gguf", "--json", *opts)
    assert r.code == 0, r.err
    return r.json(), json.loads((out / "ct-convert.json").read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_weights_equal_the_library_decompression(cli, tmp_path, name):
    opts, want_type = CASES[name]
    out = tmp_path / "out"
    summary, manifest = repack(cli, FIXTURES / name, out, *opts)
    assert summary["verified"] is True
    tensors, fields = read_back(out / "model.gguf")
    ref = load_file(FIXTURES / name / "reference.safetensors")
    reader = open_checkpoint(resolve(str(FIXTURES / name)))
    for key, want in ref.items():
        module = key.removesuffix(".weight")
        t = tensors[gguf_tensor_name(module)[0]]
        assert gguf.GGMLQuantizationType(t.tensor_type).name == want_type, module
        got = value(t)
        if want_type == "NVFP4":  # llama.cpp multiplies the block value by `.scale` (= 1/global scale)
            got = got * float(tensors[t.name.replace(".weight", ".scale")].data[0])
        leaf = module.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj"):
            n_head = fields["llama.attention.head_count" if leaf == "q_proj" else "llama.attention.head_count_kv"]
            got = hf_rows(got, n_head)
        exact = reader.read(module).dequantize(torch.float32)
        if name in SIGNLESS_ZERO:
            want, exact = positive_zeros(want), positive_zeros(exact)
        assert equal_bits(got.to(want.dtype), want), module  # the library's own decompression
        if want_type not in ("NVFP4", "BF16"):  # ggml holds the exact value (q - zp)·s; BF16 only its rounding
            assert equal_bits(got, exact), module
    expect_fallback = want_type == "BF16"
    assert bool(manifest["fallbacks"]) == expect_fallback
    if expect_fallback:
        assert {f["module"] for f in manifest["fallbacks"]} == {k.removesuffix(".weight") for k in ref}
        assert all(f["written_as"] == "BF16" and f["reason"] for f in manifest["fallbacks"])
        assert any("written unquantized" in n for n in summary["notes"])


def test_rope_permutation_moves_rows_not_values(cli, tmp_path):
    """attn_q as stored is HF q_proj with rows reordered pairwise inside each head (llama only)."""
    out = tmp_path / "out"
    repack(cli, FIXTURES / "w8a16-g128", out)
    tensors, fields = read_back(out / "model.gguf")
    ref = load_file(FIXTURES / "w8a16-g128" / "reference.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    stored = value(tensors["blk.0.attn_q.weight"]).to(torch.bfloat16)
    hd = 64
    for r in (0, 1, 2, 63, 64, 65, 127):
        h, i, j = r // hd, (r % hd) // 2, r % 2
        assert equal_bits(stored[r], ref[h * hd + j * hd // 2 + i]), r
    assert not torch.equal(stored, ref)


def test_qwen3moe_experts_are_stacked(cli, tmp_path):
    out = tmp_path / "out"
    summary, manifest = repack(cli, MOE, out)
    assert summary["unconverted"] == [] and summary["verified"] is True
    tensors, fields = read_back(out / "model.gguf")
    assert fields["general.architecture"] == "qwen3moe"
    assert fields["qwen3moe.expert_count"] == 4 and fields["qwen3moe.expert_used_count"] == 2
    assert fields["qwen3moe.expert_feed_forward_length"] == 128
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    assert [int(x) for x in gate.shape] == [128, 128, 4]  # ggml ne = {K, N, E}
    assert gguf.GGMLQuantizationType(gate.tensor_type).name == "Q4_0"
    assert gguf.GGMLQuantizationType(tensors["blk.0.ffn_gate_inp.weight"].tensor_type).name == "F32"
    assert gguf.GGMLQuantizationType(tensors["blk.0.attn_q_norm.weight"].tensor_type).name == "F32"
    ref = load_file(MOE / "reference.safetensors")
    for key, want in ref.items():
        name, expert = gguf_tensor_name(key.removesuffix(".weight"))
        got = value(tensors[name], expert)
        assert equal_bits(got.to(torch.bfloat16), want), key
    assert manifest["modules"]["model.layers.1.mlp.experts.3.down_proj"] == {
        "status": "converted", "tensor": "blk.1.ffn_down_exps.weight", "type": "Q4_0", "expert": 3,
        "verified": {"exact": True, "max_abs_error": 0.0},
    }  # fmt: skip


def test_bpe_tokenizer_special_tokens_and_template(cli, tmp_path):
    out = tmp_path / "out"
    summary, _ = repack(cli, MOE, out)
    _, f = read_back(out / "model.gguf")
    tok = json.loads((MOE / "tokenizer.json").read_text())
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "default"  # a locally trained tokenizer is in no llama.cpp table
    assert any("pre-tokenizer not recognized" in n for n in summary["notes"])
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and tokens[-1] == "[PAD319]"
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    assert f["tokenizer.ggml.merges"][0] == " ".join(tok["model"]["merges"][0]) if isinstance(tok["model"]["merges"][0], list) else tok["model"]["merges"][0]
    eos = tok["model"]["vocab"]["<|im_end|>"]
    assert f["tokenizer.ggml.eos_token_id"] == eos and f["tokenizer.ggml.token_type"][eos] == 3
    assert "<|im_start|>" in f["tokenizer.chat_template"]


def test_strict_refuses_an_unknown_pre_tokenizer(cli, tmp_path):
    r = cli("repack", MOE, tmp_path / "out", "--target", "gguf", "--strict")
    assert r.code == 2 and "pre-tokenizer not recognized" in r.err
    assert not (tmp_path / "out").exists()


def test_vocab_from_copies_the_tokenizer(cli, tmp_path):
    first = tmp_path / "first"
    repack(cli, MOE, first)
    src = tmp_path / "src"
    shutil.copytree(MOE, src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    out = tmp_path / "out"
    summary, _ = repack(cli, src, out, "--vocab-from", first / "model.gguf")
    _, a = read_back(first / "model.gguf")
    _, b = read_back(out / "model.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template"):
        assert a[key] == b[key], key
    r = cli("repack", FIXTURES / "w4a16-g128", tmp_path / "bad", "--target", "gguf", "--vocab-from", first / "model.gguf")
    assert r.code == 2 and "320 tokens" in r.err and not (tmp_path / "bad").exists()


def test_no_tokenizer_writes_a_no_vocab_file(cli, tmp_path):
    out = tmp_path / "out"
    summary, _ = repack(cli, FIXTURES / "w4a16-g128", out)
    _, f = read_back(out / "model.gguf")
    assert f["tokenizer.ggml.model"] == "none" and f["llama.vocab_size"] == 64
    assert "tokenizer.ggml.tokens" not in f
    assert any("no vocabulary" in n for n in summary["notes"])
    assert sorted(p.name for p in out.iterdir()) == ["ct-convert.json", "model.gguf"]


def test_llama_hyperparameters(cli, tmp_path):
    out = tmp_path / "out"
    repack(cli, FIXTURES / "w4a16-g128", out)
    _, f = read_back(out / "model.gguf")
    cfg = json.loads((FIXTURES / "w4a16-g128" / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.rope.dimension_count"] == cfg["head_dim"]
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q4_0)


def test_split_parts_above_max_shard_size(cli, tmp_path):
    out = tmp_path / "out"
    summary, manifest = repack(cli, MOE, out, "--max-shard-size", "100KB")
    parts = sorted(p.name for p in out.glob("*.gguf"))
    assert len(parts) >= 3 and parts[0] == f"model-00001-of-{len(parts):05d}.gguf"
    assert set(manifest["files"]) == set(parts)
    whole = tmp_path / "whole"
    repack(cli, MOE, whole)
    single, _ = read_back(whole / "model.gguf")
    seen = {}
    for i, p in enumerate(parts):
        tensors, f = read_back(out / p)
        assert f["split.no"] == i and f["split.count"] == len(parts) and f["split.tensors.count"] == len(single)
        assert ("tokenizer.ggml.tokens" in f) == (i == 0)
        seen.update(tensors)
    assert sorted(seen) == sorted(single)
    for name, t in single.items():
        assert np.array_equal(seen[name].data, t.data), name
    assert cli("verify", "--manifest", out).code == 0


def test_refusals_are_one_line_before_any_output(cli, tmp_path):
    src = tmp_path / "gemma"
    shutil.copytree(FIXTURES / "w4a16-g128", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["Gemma2ForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("repack", src, tmp_path / "o1", "--target", "gguf")
    assert r.code == 2 and "Gemma2ForCausalLM" in r.err and not (tmp_path / "o1").exists()
    r = cli("repack", FIXTURES / "moe-w4a16", tmp_path / "o2", "--target", "gguf")
    assert r.code == 2 and "norm_topk_prob" in r.err
    r = cli("repack", FIXTURES / "fp8-dynamic", tmp_path / "o3", "--target", "gguf", "--strict")
    assert r.code == 2 and "FP8" in r.err and "--strict" in r.err and not (tmp_path / "o3").exists()
    r = cli("repack", FIXTURES / "nvfp4a16", tmp_path / "o4", "--target", "gguf", "--strict")
    assert r.code == 2 and "--nvfp4" in r.err
    r = cli("repack", FIXTURES / "transform-online", tmp_path / "o5", "--target", "gguf")
    assert r.code == 2 and "online transform" in r.err


def test_data_level_fallback_is_reported(cli, tmp_path):
    """act-order g_idx that is not constant on 32-column blocks: BF16, listed, still exact."""
    out = tmp_path / "out"
    summary, manifest = repack(cli, FIXTURES / "legacy-0.8.1-actorder-group", out)
    (fb,) = manifest["fallbacks"]
    assert fb["module"] == "model.layers.0.mlp.down_proj" and "g_idx" in fb["reason"] and fb["written_as"] == "BF16"
    assert manifest["modules"][fb["module"]]["status"] == "dense"


def test_scale_not_fp16_exact_falls_back():
    from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight, WeightScheme
    from ct_convert.targets.gguf import mapping

    info = ModuleInfo("m", "pack-quantized", (2, 64), torch.bfloat16, Encoding.INT, WeightScheme(4, "int", True, "group", 32))
    ok = QuantizedWeight(info, scale=torch.full((2, 2), 2.0**-17, dtype=torch.bfloat16))
    tiny = QuantizedWeight(info, scale=torch.full((2, 2), (1 + 2.0**-7) * 2.0**-20, dtype=torch.bfloat16))
    big = QuantizedWeight(info, scale=torch.full((2, 2), 65536.0, dtype=torch.bfloat16))
    assert mapping.data_reason(ok, "Q4_0") is None
    assert "fp16" in mapping.data_reason(tiny, "Q4_0")
    assert "fp16" in mapping.data_reason(big, "Q4_0")


def test_inspect_lists_the_gguf_target(cli, tmp_path):
    r = cli("inspect", FIXTURES / "fp8-dynamic", "--json")
    mods = r.json()["modules"]
    assert all(m["targets"]["gguf"] is False and "FP8" in m["reasons"]["gguf"] for m in mods)
    # Q5_0 from bf16 scales: only the scales themselves say whether fp16 holds them
    r = cli("inspect", FIXTURES / "w4a16-asym-g128", "--json")
    mods = r.json()["modules"]
    assert mods and all(m["targets"]["gguf"] == "decided at repack" and "fp16" in m["at_repack"]["gguf"] for m in mods)
    assert all(m["targets"]["gguf"] is True for m in cli("inspect", FIXTURES / "mxfp4a16", "--json").json()["modules"])
    # what repack refuses for the whole checkpoint, inspect shows for every module
    src = tmp_path / "gemma"
    shutil.copytree(FIXTURES / "w4a16-g128", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["Gemma2ForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    for source, words in ((src, "Gemma2ForCausalLM"), (FIXTURES / "moe-w4a16", "norm_topk_prob")):
        mods = cli("inspect", source, "--json").json()["modules"]
        assert mods and all(m["targets"]["gguf"] is False and words in m["reasons"]["gguf"] for m in mods)


def test_vocab_size_key_only_where_llamacpp_writes_it_or_nothing_else_sizes_the_vocabulary(cli, tmp_path):
    """llama.cpp's converter writes qwen3moe.vocab_size for no Qwen model; its loader reads the key
    only for a file without vocabulary, to size the token table."""
    src = FIXTURES / "gguf" / "qwen3moe-w4a16"
    repack(cli, src, tmp_path / "with")
    _, f = read_back(tmp_path / "with" / "model.gguf")
    assert "qwen3moe.vocab_size" not in f and len(f["tokenizer.ggml.tokens"]) == 320
    bare = tmp_path / "bare"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    repack(cli, bare, tmp_path / "without")
    _, f = read_back(tmp_path / "without" / "model.gguf")
    assert f["tokenizer.ggml.model"] == "none" and f["qwen3moe.vocab_size"] == 320


def test_block_scales_by_hand():
    """d of each 32-column block is its first column's group scale: groups of 64 (a partial last one),
    channel and tensor scales, and act-order g_idx, where a group no block reads is not checked."""
    from ct_convert.qweight import Encoding, ModuleInfo, QuantizedWeight, WeightScheme
    from ct_convert.targets.gguf import mapping

    def qw(k, strategy, gs, scale, g_idx=None):
        info = ModuleInfo("m", "pack-quantized", (2, k), torch.bfloat16, Encoding.INT, WeightScheme(4, "int", True, strategy, gs))
        return QuantizedWeight(info, scale=scale.to(torch.bfloat16), g_idx=g_idx)

    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert mapping.block_scales(qw(160, "group", 64, s)).tolist() == [[1, 1, 2, 2, 3], [4, 4, 5, 5, 6]]
    assert mapping.block_scales(qw(96, "channel", None, s[:, :1])).tolist() == [[1, 1, 1], [4, 4, 4]]
    assert mapping.block_scales(qw(64, "tensor", None, torch.tensor([7.0]))).tolist() == [[7, 7], [7, 7]]
    g_idx = torch.tensor([2] * 32 + [0] * 64 + [2] * 32, dtype=torch.int32)
    unused = s.clone()
    unused[:, 1] = 65536.0  # group 1 is in no block: not fp16, never written
    acted = qw(128, "group", 64, unused, g_idx)
    assert mapping.block_scales(acted).tolist() == [[3, 1, 1, 3], [6, 4, 4, 6]]
    assert mapping.data_reason(acted, "Q4_0") is None
    unused[:, 0] = 65536.0
    assert "fp16" in mapping.data_reason(qw(128, "group", 64, unused, g_idx), "Q4_0")
