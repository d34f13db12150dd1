"""Llama-4 (`llama4`) through `--target gguf`: the interleaved dense/MoE layout read back by hand
(gguf-py's reader and dequantizers, names mapped here) against the compressed-tensors library's own
decompression (reference.safetensors), verification on a correct and a corrupted file, and the
configs llama.cpp's llama4 graph would compute differently, refused."""

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, equal_bits

INTERLEAVED = FIXTURES / "gguf" / "llama4-text-interleaved-w4a16"
VL = FIXTURES / "gguf" / "llama4-w4a16"
FFN = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def read(path):
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


def values(t, expert=None) -> torch.Tensor:
    data = t.data if expert is None else t.data[expert]
    return torch.from_numpy(np.array(gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.tensor_type))))


@pytest.fixture
def interleaved(cli, tmp_path):
    out = tmp_path / "l4"
    r = cli("repack", INTERLEAVED, out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True and r.json()["unconverted"] == []
    return out


def test_dense_and_moe_layers_interleave(interleaved):
    tensors, f = read(interleaved / "model.gguf")
    ref = load_file(INTERLEAVED / "reference.safetensors")
    assert f["general.architecture"] == "llama4"
    # llama.cpp's names: feed_forward_length is the dense layers' width (HF intermediate_size_mlp)
    assert (f["llama4.feed_forward_length"], f["llama4.expert_feed_forward_length"]) == (128, 64)
    assert f["llama4.interleave_moe_layer_step"] == 2 and f["llama4.expert_count"] == 4 and f["llama4.expert_used_count"] == 1
    assert "rope_freqs.weight" not in tensors  # default rope: no llama3 factors
    for layer in (0, 2):  # dense: (layer + 1) % 2 != 0
        assert not any(n.startswith(f"blk.{layer}.") and ("exps" in n or "shexp" in n or "gate_inp" in n) for n in tensors)
        for hf, slot in FFN.items():
            t = tensors[f"blk.{layer}.{slot}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            assert equal_bits(values(t).to(torch.bfloat16), ref[f"model.layers.{layer}.feed_forward.{hf}.weight"])
    for layer in (1, 3):
        assert f"blk.{layer}.ffn_up.weight" not in tensors
        for hf, slot in FFN.items():
            t = tensors[f"blk.{layer}.{slot}_exps.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0 and int(t.shape[2]) == 4
            for e in range(4):
                assert equal_bits(values(t, e).to(torch.bfloat16), ref[f"model.layers.{layer}.feed_forward.experts.{e}.{hf}.weight"])
            shared = values(tensors[f"blk.{layer}.{slot}_shexp.weight"]).to(torch.bfloat16)
            assert equal_bits(shared, ref[f"model.layers.{layer}.feed_forward.shared_expert.{hf}.weight"])
        router = tensors[f"blk.{layer}.ffn_gate_inp.weight"]
        assert router.tensor_type == gguf.GGMLQuantizationType.F32
        want = load_file(INTERLEAVED / "model.safetensors")[f"model.layers.{layer}.feed_forward.router.weight"].float()
        assert equal_bits(torch.from_numpy(np.array(router.data)), want)
    # no Q/K row reordering: HF's Llama-4 rope already rotates adjacent pairs, as llama.cpp's does
    assert equal_bits(values(tensors["blk.3.attn_q.weight"]).to(torch.bfloat16), ref["model.layers.3.self_attn.q_proj.weight"])


def test_verify_passes_and_finds_a_corrupted_expert(cli, tmp_path, interleaved):
    out = interleaved
    assert cli("verify", INTERLEAVED, out).code == 0
    t = read(out / "model.gguf")[0]["blk.3.ffn_up_exps.weight"]
    at = int(t.data_offset) + 2 * t.data[0].nbytes + 2  # expert 2, row 0, first code byte
    with open(out / "model.gguf", "r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x11]))
    r = cli("verify", INTERLEAVED, out, "--json")
    assert r.code == 1
    assert [x["module"] for x in r.json()["results"] if not x["ok"]] == ["model.layers.3.feed_forward.experts.2.up_proj"]


def test_the_vision_model_goes_to_the_mmproj_file(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("repack", VL, out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True and not r.json()["warnings"]
    dropped = json.loads((out / "ct-convert.json").read_text())["dropped_tensors"]
    assert not any(t.startswith(("vision_model.", "multi_modal_projector.")) for t in dropped)
    tower, _ = read(out / "mmproj-model.gguf")
    assert {"v.class_embd", "mm.model.fc.weight"} <= set(tower)
    tensors, f = read(out / "model.gguf")
    assert not any(n.startswith(("v.", "mm.")) for n in tensors)
    # Scout's llama3 rope with low_freq_factor == high_freq_factor: every factor is 1 or `factor`
    freqs = np.array(tensors["rope_freqs.weight"].data)
    assert set(freqs.tolist()) <= {1.0, 16.0} and freqs[0] == 1.0 and freqs[-1] == 16.0


def _set(**kv):
    return lambda c: c.update(kv)


def _drop(*keys):
    return lambda c: [c.pop(k, None) for k in keys]


REFUSED = {  # config change -> words of the one-line refusal
    "experts every layer": (lambda c: (c.update(interleave_moe_layer_step=1), c.pop("moe_layers")), "interleave_moe_layer_step"),
    "moe_layers not interleaved": (_set(moe_layers=[1, 2]), "moe_layers"),
    "nope every 2nd layer": (lambda c: (c.update(no_rope_layer_interval=2), _drop("no_rope_layers", "layer_types")(c)), "no_rope_layers"),
    "chunks not llama.cpp's": (_set(attention_chunk_size=32), "attention_chunk_size"),
    "chunked layers differ": (_set(layer_types=["chunked_attention", "full_attention", "chunked_attention", "full_attention"]), "layer_types"),
    "all full attention": (_set(layer_types=["full_attention"] * 4), "full attention"),
    "no temperature": (_set(attn_temperature_tuning=False), "temperature"),
    "qk norm off": (_set(use_qk_norm=False), "use_qk_norm"),
    "gelu": (_set(hidden_act="gelu"), "hidden_act"),
    "dense width": (_set(intermediate_size_mlp=256), "intermediate_size_mlp"),
    "expert width": (_set(intermediate_size=32), "intermediate_size"),
    "llama3 factors reversed": (_set(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 4.0,
                                                      "high_freq_factor": 1.0, "original_max_position_embeddings": 64}), "high_freq_factor"),  # fmt: skip
    "no rope list": (_set(no_rope_layers=[1, 1]), "no_rope_layers"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_llama_cpp_computes_differently_is_refused(cli, tmp_path, case):
    patch, words = REFUSED[case]
    src = tmp_path / "src"
    shutil.copytree(INTERLEAVED, src)
    cfg = json.loads((src / "config.json").read_text())
    patch(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("repack", src, tmp_path / "out", "--target", "gguf")
    assert r.code == 2, r.err
    assert words in r.err and "config.json" in r.err and len(r.err.strip().splitlines()) <= 2, r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fixture", ["llama4-w4a16", "mistral3-w4a16"])
def test_a_vl_checkpoints_text_config_is_checked_against_its_tensors(cli, tmp_path, fixture):
    """The numbers of a multimodal checkpoint's text model live in text_config, its tensors under
    `language_model.`: both are what hparams checks (the vision tower's layers do not count)."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gguf" / fixture, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("repack", src, tmp_path / "out", "--target", "gguf")
    assert r.code == 2 and "num_hidden_layers is 3, but the checkpoint's tensors hold layers 0..1" in r.err, r.err
    assert not (tmp_path / "out").exists()


def test_llama3_rope_with_a_wavelength_on_equal_bounds_is_refused(cli, tmp_path):
    """Equal low/high_freq_factor (Scout's) are fine, but a wavelength exactly on them has no llama3
    factor (0/0; llama.cpp's converter divides by zero): refused, never a NaN in rope_freqs."""
    src = tmp_path / "src"
    shutil.copytree(VL, src)
    cfg = json.loads((src / "config.json").read_text())
    low = 64 / (2 * math.pi)  # the first rope frequency is 1: its wavelength 2*pi is original_max_position_embeddings / low
    cfg["text_config"]["rope_parameters"].update(low_freq_factor=low, high_freq_factor=low, original_max_position_embeddings=64)
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("repack", src, tmp_path / "out", "--target", "gguf")
    assert r.code == 2 and "non-finite" in r.err, r.err
    assert not (tmp_path / "out").exists()
