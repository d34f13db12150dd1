"""DeepSeek-V3 / Kimi-K2 (llama.cpp's deepseek2) in the GGUF target: kv_b_proj's per-head split into
attn_k_b (transposed) and attn_v_b checked against hand-computed values and the compressed-tensors
library's own decompression, the k_b fallback in the manifest, verification of the split, MTP
layers, both config styles, and refusals. Equality with llama.cpp's converter: test_gguf_llamacpp.py."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, equal_bits
from ct_convert.architectures import Part

DEEPSEEK = FIXTURES / "gguf" / "deepseek-v3-w4a16"  # kv_b_proj quantized (int4 g128), kv_lora 128
KIMI = FIXTURES / "gguf" / "kimi-k2-w4a16-g32"  # kv_b_proj unquantized (Kimi-K2-Thinking's ignore list)
KV_B = "model.layers.0.self_attn.kv_b_proj"


def _copy(src, tmp_path, config=None, tensors=None):
    """A copy of a fixture with its config.json updated by `config` and its tensors by `tensors`."""
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _repack(cli, src, out, *opts):
    r = cli("repack", src, out, "--target", "gguf", "--json", *opts)
    assert r.code == 0, r.err
    return r.json(), json.loads((out / "ct-convert.json").read_text())


def _tensors(path):
    reader = gguf.GGUFReader(path)
    return {t.name: t for t in reader.tensors}, {k: f.contents() for k, f in reader.fields.items()}


def _bf16(t) -> torch.Tensor:
    return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)


def test_kv_b_split_of_a_dense_source_equals_the_hand_computed_layout(cli, tmp_path):
    """kv_b_proj [2 heads · (32 nope + 32 v), 64 kv_lora] holding 64·row + col (exact in float32):
    attn_k_b[h, c, j] = row h·64 + j, column c; attn_v_b[h, i, c] = row h·64 + 32 + i, column c."""

    def numbered(t):
        t[f"{KV_B}.weight"] = torch.arange(128 * 64, dtype=torch.float32).reshape(128, 64)

    out = tmp_path / "out"
    summary, manifest = _repack(cli, _copy(KIMI, tmp_path, tensors=numbered), out)
    assert summary["verified"] is True
    tensors, _ = _tensors(out / "model.gguf")
    h, c, j = np.arange(2)[:, None, None], np.arange(64)[None, :, None], np.arange(32)[None, None, :]
    k_b, v_b = tensors["blk.0.attn_k_b.weight"], tensors["blk.0.attn_v_b.weight"]
    assert k_b.tensor_type == gguf.GGMLQuantizationType.F32 and list(k_b.shape) == [32, 64, 2]
    assert np.array_equal(np.array(k_b.data), ((h * 64 + j) * 64 + c).astype(np.float32))
    i, c = np.arange(32)[None, :, None], np.arange(64)[None, None, :]
    assert v_b.tensor_type == gguf.GGMLQuantizationType.F32 and list(v_b.shape) == [64, 32, 2]
    assert np.array_equal(np.array(v_b.data), ((h * 64 + 32 + i) * 64 + c).astype(np.float32))
    assert manifest["fallbacks"] == []  # an unquantized kv_b_proj is carried, not a fallback


def test_quantized_kv_b_keeps_v_b_in_q4_0_and_lists_k_b_as_a_fallback(cli, tmp_path):
    out = tmp_path / "out"
    summary, manifest = _repack(cli, DEEPSEEK, out)
    assert summary["verified"] is True
    tensors, _ = _tensors(out / "model.gguf")
    ref = load_file(DEEPSEEK / "reference.safetensors")  # the library's own decompression (bf16)
    for layer in (0, 1):
        kv_b = ref[f"model.layers.{layer}.self_attn.kv_b_proj.weight"]  # [2 · (32 + 64), 128]
        k_b, v_b = tensors[f"blk.{layer}.attn_k_b.weight"], tensors[f"blk.{layer}.attn_v_b.weight"]
        # v_b: the source's Q4_0-exact groups run along kv_lora, which v_b keeps as its rows
        assert v_b.tensor_type == gguf.GGMLQuantizationType.Q4_0 and list(v_b.shape) == [128, 64, 2]
        got_v = torch.from_numpy(np.array(gguf.quants.dequantize(v_b.data, v_b.tensor_type))).to(torch.bfloat16)
        # k_b: transposed, so a block would run across 32 nope rows of one column: dense BF16
        assert k_b.tensor_type == gguf.GGMLQuantizationType.BF16 and list(k_b.shape) == [32, 128, 2]
        got_k = _bf16(k_b)
        for head in (0, 1):
            assert equal_bits(got_v[head], kv_b[head * 96 + 32 : head * 96 + 96])
            assert equal_bits(got_k[head], kv_b[head * 96 : head * 96 + 32].t().contiguous())
        module = manifest["modules"][f"model.layers.{layer}.self_attn.kv_b_proj"]
        assert module["status"] == "dense"
        assert module["tensor"] == [f"blk.{layer}.attn_k_b.weight", f"blk.{layer}.attn_v_b.weight"]
        assert module["type"] == ["BF16", "Q4_0"]
    assert [(f["module"], f["tensor"], f["written_as"]) for f in manifest["fallbacks"]] == [
        (f"model.layers.{n}.self_attn.kv_b_proj", f"blk.{n}.attn_k_b.weight", "BF16") for n in (0, 1)
    ]
    assert all("transposed" in f["reason"] for f in manifest["fallbacks"])
    assert cli("repack", DEEPSEEK, tmp_path / "strict", "--target", "gguf", "--strict").code == 2


@pytest.mark.parametrize("tensor, offset", [("blk.0.attn_k_b.weight", 2 * 7), ("blk.0.attn_v_b.weight", 2)])
def test_verify_finds_a_changed_byte_in_either_half_of_kv_b(cli, tmp_path, tensor, offset):
    out = tmp_path / "out"
    assert cli("repack", DEEPSEEK, out, "--target", "gguf", "--no-verify", "-q").code == 0
    assert cli("verify", DEEPSEEK, out).code == 0
    t = _tensors(out / "model.gguf")[0][tensor]
    with open(out / "model.gguf", "r+b") as f:  # k_b: a bf16 value's low byte; v_b: a Q4_0 code byte
        f.seek(int(t.data_offset) + offset)
        byte = f.read(1)[0]
        f.seek(int(t.data_offset) + offset)
        f.write(bytes([byte ^ 0x11]))
    r = cli("verify", DEEPSEEK, out, "--json")
    assert r.code == 1
    assert [x["module"] for x in r.json()["results"] if not x["ok"]] == [KV_B]


def test_both_config_styles_give_the_same_metadata(cli, tmp_path):
    """transformers-4 keys (rope_scaling with `type`, top-level rope_theta), as Kimi's raw config has
    them, and transformers-5 keys (rope_parameters) are read alike."""

    def legacy(cfg):
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        cfg["rope_scaling"] = params

    _repack(cli, DEEPSEEK, tmp_path / "v5", "--no-verify")
    _repack(cli, _copy(DEEPSEEK, tmp_path, config=legacy), tmp_path / "v4", "--no-verify")
    new, old = (_tensors(tmp_path / v / "model.gguf")[1] for v in ("v5", "v4"))
    new.pop("general.name"), old.pop("general.name")
    assert new == old
    assert new["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert new["deepseek2.rope.freq_base"] == 10000.0 and new["deepseek2.attention.head_count_kv"] == 1


def test_multi_token_prediction_layers_are_dropped(cli, tmp_path):
    """A layer numbered num_hidden_layers (the config's num_nextn_predict_layers 1): not in the GGUF,
    listed as dropped, and verification passes without it."""

    def mtp(t):
        t.update({k.replace("model.layers.1.", "model.layers.2."): v.clone() for k, v in t.items() if k.startswith("model.layers.1.")})

    src = _copy(DEEPSEEK, tmp_path, tensors=mtp)
    out = tmp_path / "out"
    summary, manifest = _repack(cli, src, out)
    assert summary["verified"] is True
    tensors, fields = _tensors(out / "model.gguf")
    assert fields["deepseek2.block_count"] == 2 and not any(n.startswith("blk.2.") for n in tensors)
    dropped = manifest["dropped_tensors"]
    assert "model.layers.2.self_attn.kv_b_proj" in dropped and "model.layers.2.mlp.experts.3.up_proj" in dropped
    assert "model.layers.2.input_layernorm.weight" in dropped
    assert not any(m.startswith("model.layers.2.") for m in manifest["modules"])
    assert cli("verify", src, out).code == 0

    no_mtp = _copy(src, tmp_path / "b", config=lambda cfg: cfg.update(num_nextn_predict_layers=0))
    r = cli("repack", no_mtp, tmp_path / "refused", "--target", "gguf")
    assert r.code == 2 and "num_hidden_layers" in r.err and not (tmp_path / "refused").exists()


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(v_head_dim=32), ["v_head_dim", "kv_b_proj", "192 rows"]),
        (dict(qk_rope_head_dim=16), ["qk_rope_head_dim", "kv_a_proj_with_mqa", "160 rows"]),
        (dict(kv_lora_rank=64), ["kv_lora_rank", "kv_a_proj_with_mqa", "160 rows"]),
        (dict(qk_nope_head_dim=None), ["qk_nope_head_dim"]),
        (dict(num_key_value_heads=1), ["num_key_value_heads", "every attention head"]),
        (dict(topk_group=2), ["topk_group"]),
        (dict(n_group=3), ["n_group"]),
        (dict(scoring_func="sqrtsoftplus"), ["scoring_func"]),
        (dict(rope_interleave=False), ["rope_interleave"]),
    ],
)
def test_a_broken_mla_config_is_refused_before_any_output(cli, tmp_path, change, words):
    def edit(cfg):
        for key, value in change.items():
            if value is None:
                cfg.pop(key)
            else:
                cfg[key] = value

    src = _copy(DEEPSEEK, tmp_path, config=edit)
    r = cli("repack", src, tmp_path / "out", "--target", "gguf")
    assert r.code == 2, r.err
    assert all(w in r.err for w in words), r.err
    assert "Traceback" not in r.err and not (tmp_path / "out").exists()


def test_a_part_arranges_rows_per_head_and_flattens_back():
    t = torch.arange(6 * 4).reshape(6, 4)
    pick = Part("x", select=lambda n: torch.tensor([0, 1, 3, 4]), heads=2, transpose=True)
    assert pick.shape((6, 4)) == (2, 4, 2)
    v = pick.arrange(t)
    assert v.tolist() == [[[0, 4], [1, 5], [2, 6], [3, 7]], [[12, 16], [13, 17], [14, 18], [15, 19]]]
    assert torch.equal(pick.flatten(v), t[[0, 1, 3, 4]])
    plain = Part("y", heads=3)
    assert plain.shape((6, 4)) == (3, 2, 4) and torch.equal(plain.flatten(plain.arrange(t)), t)


def test_a_deepseek2_gguf_without_the_mla_keys_is_refused_by_the_reader():
    """Older deepseek2 GGUFs kept kv_b_proj whole and lack key_length_mla: not read as ours."""
    from ct_convert.architectures.deepseek import DeepseekV2Model
    from ct_convert.errors import InputError

    fields = {"deepseek2.attention.head_count": 2, "deepseek2.block_count": 2, "deepseek2.rope.dimension_count": 32}
    with pytest.raises(InputError, match="key_length_mla"):
        DeepseekV2Model.from_gguf(fields.get)


def test_stacked_experts_are_produced_one_expert_at_a_time(tmp_path, monkeypatch):
    """Memory for a 384-expert layer: each job of a stacked tensor decodes one expert (bench/moe_memory.py
    measures the peak RSS this gives)."""
    from ct_convert.readers.checkpoint import open_checkpoint
    from ct_convert.source import resolve
    from ct_convert.targets import writer_for
    from ct_convert.targets.gguf import writer as gguf_writer
    from ct_convert.targets.writer_base import RepackOptions

    reader = open_checkpoint(resolve(str(KIMI)))
    writer, opts = writer_for("gguf"), RepackOptions(target="gguf", workers=2)
    plan = writer.plan(reader, opts)
    jobs, real = [], gguf_writer._produce
    monkeypatch.setattr(gguf_writer, "_produce", lambda r, unit, source: jobs.append((unit, source)) or real(r, unit, source))
    (tmp_path / "out").mkdir()
    writer.write(plan, reader, tmp_path / "out", opts, lambda n: None)
    stacked = [(u, s) for u, s in jobs if len(u.sources) > 1]
    assert {u.outputs[0].name for u, _ in stacked} == {f"blk.1.ffn_{p}_exps.weight" for p in ("gate", "up", "down")}
    assert all(s in u.sources for u, s in stacked) and len(stacked) == 3 * 4  # one job per expert
