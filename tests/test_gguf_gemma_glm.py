"""Gemma-3 (gemma3) and GLM-4.5 (glm4moe) in `--target gguf`, beyond the comparison with llama.cpp's
converter (test_gguf_llamacpp.py): the bits of Gemma's 1 + w norms against hand-computed float32
patterns, the token embedding cut to the real vocabulary, block_count with GLM's MTP layers, verify on
correct and corrupted output, and configs llama.cpp's graphs would compute differently."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, equal_bits
from ct_convert.architectures.gemma import norm_plus_one

GEMMA = FIXTURES / "gguf" / "gemma3-text-w4a16-g32"
GEMMA_VL = FIXTURES / "gguf" / "gemma3-vl-w4a16-g32"
GLM = FIXTURES / "gguf" / "glm4moe-mixed-w8a16-w4a16"

# bf16 source bits -> float32 bits llama.cpp stores for 1 + w (widened to float32, then added),
# worked out by hand: -1 gives +0, -0 gives exactly 1, 2^-20 survives in float32 (it would not in bf16)
# while 2^-30 is below half an ulp of 1.0f and rounds away
NORM_BITS = [
    (0xBF80, 0x00000000),  # -1.0 -> +0.0
    (0x8000, 0x3F800000),  # -0.0 -> 1.0
    (0x0000, 0x3F800000),  # +0.0 -> 1.0
    (0x3F00, 0x3FC00000),  # 0.5 -> 1.5
    (0xC040, 0xC0000000),  # -3.0 -> -2.0
    (0x3F81, 0x40008000),  # 1.0078125 -> 2.0078125
    (0x3580, 0x3F800008),  # 2^-20 -> 1 + 2^-20
    (0x3080, 0x3F800000),  # 2^-30 -> 1.0
]


def _bf16(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def _f32(bits: list[int]) -> torch.Tensor:
    return torch.tensor(np.array(bits, dtype=np.uint32).view(np.int32)).view(torch.float32)


def copy_fixture(src, dst, config=None, tensors=None):
    """A copy of a fixture with config.json keys replaced (None deletes) and tensors of
    model.safetensors replaced or added."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        for path, value in config.items():
            *outer, key = path.split("/")
            node = cfg
            for k in outer:
                node = node[k]
            if value is None:
                node.pop(key, None)
            else:
                node[key] = value
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        held = load_file(dst / "model.safetensors")
        held.update(tensors)
        save_file(held, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def read(out):
    r = gguf.GGUFReader(out / "model.gguf")
    return {t.name: t for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


def test_norm_plus_one_bits():
    src = _bf16([b for b, _ in NORM_BITS])
    assert equal_bits(norm_plus_one(src), _f32([f for _, f in NORM_BITS]))
    # float16 stays float16, as llama.cpp widens only other dtypes: 1 + 2^-12 rounds to 1.0 there
    half = torch.tensor([2.0**-12, -1.0], dtype=torch.float16)
    assert equal_bits(norm_plus_one(half), torch.tensor([1.0, 0.0], dtype=torch.float16))


def test_gemma_norms_are_written_as_one_plus_w(cli, tmp_path):
    """The hand-computed bit patterns, through a whole repack (verified), in the F32 output_norm."""
    norm = load_file(GEMMA / "model.safetensors")["model.norm.weight"].clone()
    bits = [b for b, _ in NORM_BITS]
    norm[: len(bits)] = _bf16(bits)
    src = copy_fixture(GEMMA, tmp_path / "src", tensors={"model.norm.weight": norm})
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    tensors, _ = read(out)
    t = tensors["output_norm.weight"]
    assert gguf.GGMLQuantizationType(t.tensor_type).name == "F32"
    stored = torch.from_numpy(np.array(t.data)).view(torch.int32)
    assert torch.equal(stored[: len(bits)], _f32([f for _, f in NORM_BITS]).view(torch.int32))
    rest = norm[len(bits):].to(torch.float32) + 1.0
    assert torch.equal(stored[len(bits):], rest.view(torch.int32))


def _corrupt(out, tensor: str, index: int, value: float) -> None:
    t = read(out)[0][tensor]
    assert gguf.GGMLQuantizationType(t.tensor_type).name == "F32"
    with open(out / "model.gguf", "r+b") as f:
        f.seek(t.data_offset + 4 * index)
        f.write(np.float32(value).tobytes())


@pytest.mark.parametrize("how", ["one ulp", "w instead of 1 + w"])
def test_verify_passes_on_correct_and_fails_on_corrupted_output(cli, tmp_path, how):
    out = tmp_path / "out"
    assert cli("repack", GEMMA, out, "--target", "gguf").code == 0
    r = cli("verify", GEMMA, out, "--json")
    assert r.code == 0 and r.json()["ok"], r.out
    w = float(load_file(GEMMA / "model.safetensors")["model.layers.1.self_attn.q_norm.weight"][3])
    stored = np.float32(w) + np.float32(1.0)
    _corrupt(out, "blk.1.attn_q_norm.weight", 3, np.nextafter(stored, np.float32(np.inf)) if how == "one ulp" else w)
    r = cli("verify", GEMMA, out, "--json")
    assert r.code == 1
    bad = [x["module"] for x in r.json()["results"] if not x["ok"]]
    assert bad == ["model.layers.1.self_attn.q_norm.weight"]


@pytest.mark.parametrize("vocab_size,rows", [(390, 390), (None, 384)])
def test_gemma_token_embd_cut_to_the_real_vocabulary(cli, tmp_path, vocab_size, rows):
    """Gemma3Model.modify_tensors keeps the rows of the SentencePiece vocabulary llama.cpp builds:
    vocab_size tokens, or the tokenizer.model's 384 pieces without it; the embedding has 400 rows."""
    src = copy_fixture(GEMMA, tmp_path / "src", config={"vocab_size": vocab_size})
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    tensors, fields = read(out)
    assert [int(x) for x in tensors["token_embd.weight"].shape] == [64, rows]
    assert len(fields["tokenizer.ggml.tokens"]) == rows
    embed = load_file(GEMMA / "model.safetensors")["model.embed_tokens.weight"]
    stored = torch.from_numpy(np.array(tensors["token_embd.weight"].data).view(np.int16)).view(torch.bfloat16)
    assert equal_bits(stored.reshape(rows, 64), embed[:rows])
    assert cli("verify", src, out).code == 0


def test_gemma_vl_text_model_and_its_tower_in_the_mmproj_file(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("repack", GEMMA_VL, out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    tensors, fields = read(out)
    assert fields["general.architecture"] == "gemma3" and fields["gemma3.block_count"] == 2
    assert not any(n.startswith(("v.", "mm.")) for n in tensors)
    dropped = json.loads((out / "ct-convert.json").read_text())["dropped_tensors"]
    assert not any(t.startswith(("vision_tower.", "multi_modal_projector.")) for t in dropped) and not r.json()["warnings"]
    tower = {t.name for t in gguf.GGUFReader(out / "mmproj-model.gguf").tensors}
    assert {"mm.soft_emb_norm.weight", "mm.input_projection.weight", "v.patch_embd.weight"} <= tower


@pytest.mark.parametrize("nextn,blocks", [(1, 3), (0, 2), (None, 2)])
def test_glm_block_count_counts_mtp_layers(cli, tmp_path, nextn, blocks):
    """block_count = num_hidden_layers + num_nextn_predict_layers, though the checkpoint holds no
    MTP layer; nextn_predict_layers is written whenever the config has the key."""
    src = copy_fixture(GLM, tmp_path / "src", config={"num_nextn_predict_layers": nextn})
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf")
    assert r.code == 0, r.err
    tensors, fields = read(out)
    assert fields["glm4moe.block_count"] == blocks
    assert fields.get("glm4moe.nextn_predict_layers") == nextn
    assert not any(n.startswith("blk.2.") for n in tensors)  # the fixture holds no MTP layer


def _mtp_layer() -> dict:
    """GLM's MTP layer 2 as the original checkpoints hold it (unquantized): a whole MoE decoder layer
    plus eh_proj, enorm, hnorm and shared_head.norm."""
    g = torch.Generator().manual_seed(0)
    shapes = {
        "eh_proj.weight": (64, 128), "enorm.weight": (64,), "hnorm.weight": (64,), "shared_head.norm.weight": (64,),
        "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
        "self_attn.q_proj.weight": (128, 64), "self_attn.q_proj.bias": (128,), "self_attn.k_proj.weight": (64, 64),
        "self_attn.k_proj.bias": (64,), "self_attn.v_proj.weight": (64, 64), "self_attn.v_proj.bias": (64,),
        "self_attn.o_proj.weight": (64, 128), "mlp.gate.weight": (4, 64), "mlp.gate.e_score_correction_bias": (4,),
        **{f"mlp.{e}{p}_proj.weight": (64, 64) for e in ("shared_experts.", *(f"experts.{i}." for i in range(4)))
           for p in ("gate", "up", "down")},
    }  # fmt: skip
    return {f"model.layers.2.{k}": torch.randn(v, generator=g).to(torch.bfloat16) for k, v in shapes.items()}


def test_glm_mtp_layer_tensors_are_written_when_present(cli, tmp_path):
    src = copy_fixture(GLM, tmp_path / "src", tensors=_mtp_layer())
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf")
    assert r.code == 0, r.err
    tensors, fields = read(out)
    assert fields["glm4moe.block_count"] == 3
    assert {"blk.2.nextn.eh_proj.weight", "blk.2.nextn.enorm.weight", "blk.2.nextn.hnorm.weight",
            "blk.2.nextn.shared_head_norm.weight", "blk.2.exp_probs_b.bias"} <= set(tensors)  # fmt: skip
    assert [int(x) for x in tensors["blk.2.nextn.eh_proj.weight"].shape] == [128, 64]
    assert [int(x) for x in tensors["blk.2.ffn_up_exps.weight"].shape] == [64, 64, 4]
    assert cli("verify", src, out).code == 0


@pytest.mark.parametrize("source,config,tensors,words", [
    # llama.cpp makes every gemma3 layer sliding but each 6th: layer 1 full attention is another model
    (GEMMA, {"layer_types": ["sliding_attention", "full_attention"]}, None, "layer_types makes layer 1 full_attention"),
    # llama.cpp scales queries by 1/sqrt(head_dim) (n_embd/n_head only at 62 layers)
    (GEMMA, {"query_pre_attn_scalar": 64}, None, "query_pre_attn_scalar is 64"),
    (GEMMA, {"attn_logit_softcapping": 50.0}, None, "attn_logit_softcapping"),
    (GEMMA, {"rope_parameters/sliding_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}}, None,
     "sliding-window layers"),
    (GEMMA, {"rope_parameters/full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6}}, None, "'yarn'"),
    # the text model's numbers live in text_config: checked against the language_model.* tensors
    (GEMMA_VL, {"text_config/num_hidden_layers": 3}, None, "num_hidden_layers is 3"),
    (GEMMA_VL, {"text_config/intermediate_size": 96}, None, "intermediate_size is 96"),
    # MTP layers present but not declared, or claimed beyond the trunk
    (GLM, {"num_nextn_predict_layers": 0}, _mtp_layer(), "layers 0..2"),
    (GLM, {"num_nextn_predict_layers": 10**9}, None, "num_nextn_predict_layers is 1000000000"),
    (GLM, {"first_k_dense_replace": 0}, None, "experts are in layers 1..1"),
    (GLM, {"n_shared_experts": 0}, None, "always adds a shared expert"),
    (GLM, {"norm_topk_prob": None}, None, "missing 'norm_topk_prob'"),
    (GEMMA, {"use_bidirectional_attention": True}, None, "causal"),
    # 500 tokens (400 pieces and [PAD]s) for a 400-row embedding: no llama.cpp loads that file
    (GEMMA, {"vocab_size": 500}, None, "500 tokens but the token embedding keeps 400 rows"),
    # the experts after the dense layer 0 size moe_intermediate_size
    (GLM, {"moe_intermediate_size": 32}, None, "moe_intermediate_size is 32"),
])  # fmt: skip
def test_refused_configs(cli, tmp_path, source, config, tensors, words):
    src = copy_fixture(source, tmp_path / "src", config=config, tensors=tensors)
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf")
    assert r.code == 2, r.err
    assert words in r.err and "Traceback" not in r.err
    assert not out.exists()


def _hf_logits(src, ids):
    """transformers in float32 on the exact dequantized weights (experts fused as transformers holds them)."""
    import transformers

    from ct_convert.readers.checkpoint import open_checkpoint
    from ct_convert.source import resolve

    reader = open_checkpoint(resolve(str(src)))
    cfg = transformers.AutoConfig.from_pretrained(src)
    cfg.quantization_config = None
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = {f"{m}.weight": reader.read(m).dequantize(torch.float32) for m in reader.modules}
    sd.update({t: reader.get(t).float() for t in reader.passthrough() if not reader.is_quantization_param(t)})
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.0.gate_proj.weight" in sd:
            n = cfg.n_routed_experts
            sd[f"{p}.gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")]) for e in range(n)])
            sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(n)])
    model.load_state_dict(sd, strict=not cfg.tie_word_embeddings)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.engine
@pytest.mark.skipif(os.environ.get("CT_CONVERT_ENGINE_TESTS") != "1", reason="set CT_CONVERT_ENGINE_TESTS=1")
@pytest.mark.parametrize("source,bound", [
    # ggml's CPU GELU looks its input up in a float16 table: Gemma's all-F32 logits differ by ~3e-3
    (GEMMA, 1e-2),
    (GLM, 1e-3),
])  # fmt: skip
def test_llama_cpp_logits_match_transformers(cli, tmp_path, source, bound):
    """llama.cpp runs our GGUF (an all-F32 copy of it, so only llama.cpp's own arithmetic differs) like
    transformers runs the dequantized source, over 50 positions: beyond Gemma's 16-token sliding
    window, through its 1 + w norms, GLM's dense and MoE layers and its sigmoid router."""
    pytest.importorskip("llama_cpp")
    from test_gguf_engine import f32_copy, llama_logits

    out = tmp_path / "out"
    assert cli("repack", source, out, "--target", "gguf").code == 0
    ids = list(range(10, 60))
    ref = _hf_logits(source, ids)
    f32 = tmp_path / "f32.gguf"
    f32_copy(out / "model.gguf", f32)
    assert np.abs(llama_logits(f32, ids) - ref).max() / np.abs(ref).max() < bound
    quant = llama_logits(out / "model.gguf", ids)  # ggml rounds activations to 8 bits for the block dot products
    assert (quant.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


T4_ROPE = {"rope_parameters": None, "layer_types": None, "_sliding_window_pattern": None, "rope_theta": 1e6,
           "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}  # fmt: skip


@pytest.mark.parametrize("config,want,absent", [
    # transformers-5 keys, the full-attention layers scaled (Gemma-3-4B and up)
    ({"rope_parameters/full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
     {"rope.freq_base": 1e6, "rope.freq_base_swa": 1e4, "rope.scaling.type": "linear", "rope.scaling.factor": 8.0,
      "attention.sliding_window": 16}, ()),
    # the same model in transformers-4 keys: the same GGUF keys
    ({**T4_ROPE, "sliding_window_pattern": 6},
     {"rope.freq_base": 1e6, "rope.freq_base_swa": 1e4, "rope.scaling.type": "linear", "rope.scaling.factor": 8.0,
      "attention.sliding_window": 16}, ()),
    # pattern 1: no sliding layer, so no window (and transformers makes every layer full attention)
    ({**T4_ROPE, "sliding_window_pattern": 1, "rope_scaling": None}, {"rope.freq_base": 1e6},
     ("attention.sliding_window", "rope.scaling.type")),
    ({"final_logit_softcapping": 30.0}, {"final_logit_softcapping": 30.0}, ()),
])  # fmt: skip
def test_gemma_keys_from_either_config_style(cli, tmp_path, config, want, absent):
    """The keys Gemma3Model and TextModel.set_gguf_parameters write, worked out from their code."""
    src = copy_fixture(GEMMA, tmp_path / "src", config=config)
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf")
    assert r.code == 0, r.err
    fields = read(out)[1]
    for key, value in want.items():
        got = fields[f"gemma3.{key}"]
        assert (got == value) if isinstance(value, str) else np.float32(got) == np.float32(value), key
    assert not [k for k in absent if f"gemma3.{k}" in fields]
    assert "gemma3.vocab_size" not in fields and "gemma3.rope.dimension_count" not in fields
