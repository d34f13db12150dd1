"""Architecture classes: the registry, and a split (one source tensor -> several GGUF tensors) on a
toy architecture defined here, written, read back and verified through the GGUF target."""

from __future__ import annotations

import json
import shutil
from functools import partial

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, equal_bits
from ct_convert import architectures
from ct_convert.architectures import ARCHITECTURES, Part
from ct_convert.architectures.llama import LlamaModel
from ct_convert.readers.checkpoint import open_checkpoint
from ct_convert.source import resolve
from ct_convert.targets import writer_for
from ct_convert.targets.writer_base import RepackOptions

FUSED = "model.layers.0.mlp.gate_up_proj"


def _rows(start: int, stop: int, n: int) -> torch.Tensor:
    return torch.arange(n)[start * n // 2 : stop * n // 2]


class ToySplitModel(LlamaModel):
    """A Llama whose gate and up projections are stored fused, rows [gate; up], as one module."""

    def modify_tensors(self, hf_name: str):
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("mlp.gate_up_proj.weight"):
            return [Part(f"blk.{layer}.ffn_gate.weight", select=partial(_rows, 0, 1)),
                    Part(f"blk.{layer}.ffn_up.weight", select=partial(_rows, 1, 2))]  # fmt: skip
        return super().modify_tensors(hf_name)


def test_every_registered_class_is_a_gguf_architecture():
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"} <= set(ARCHITECTURES)
    for name, cls in ARCHITECTURES.items():
        assert name in cls.hf_names
        assert architectures.for_gguf(gguf.MODEL_ARCH_NAMES[cls.gguf_arch]) is not None


def test_llama_q_and_k_rows_take_llama_cpps_rope_order():
    model = LlamaModel(1, n_head=2, n_head_kv=1)
    (q,) = model.modify_tensors("model.layers.0.self_attn.q_proj.weight")
    (v,) = model.modify_tensors("model.layers.0.self_attn.v_proj.weight")
    assert q.name == "blk.0.attn_q.weight" and v.select is None
    # head of 8 rows: stored row 2i + j is HF row j*4 + i
    assert q.rows(16).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert model.modify_tensors("model.layers.0.mlp.experts.3.up_proj.weight")[0].expert == 3
    assert model.modify_tensors("model.layers.0.no_such.weight") is None


def _fused_source(tmp_path):
    """w4a16-g128 with gate_proj and up_proj stored as one module (packed rows are independent)."""
    src = tmp_path / "toy"
    shutil.copytree(FIXTURES / "w4a16-g128", src)
    t = load_file(src / "model.safetensors")
    gate, up = "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"
    for suffix in ("weight_packed", "weight_scale"):
        t[f"{FUSED}.{suffix}"] = torch.cat([t.pop(f"{gate}.{suffix}"), t.pop(f"{up}.{suffix}")])
    shape = t.pop(f"{gate}.weight_shape")
    t.pop(f"{up}.weight_shape")
    t[f"{FUSED}.weight_shape"] = torch.tensor([2 * int(shape[0]), int(shape[1])], dtype=shape.dtype)
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["ToySplitForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_a_split_is_planned_decoded_once_written_and_read_back(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "ToySplitForCausalLM", ToySplitModel)
    src = _fused_source(tmp_path)
    reader = open_checkpoint(resolve(str(src)))
    writer, opts = writer_for("gguf"), RepackOptions(target="gguf", workers=2)
    plan = writer.plan(reader, opts)
    (unit,) = [u for u in plan.units if FUSED in u.sources]
    assert unit.sources == (FUSED,) and [o.name for o in unit.outputs] == ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"]
    assert all(o.dtype == "Q4_0" and o.shape == (256, 128) for o in unit.outputs)
    assert plan.modules[FUSED].manifest["tensor"] == ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"]

    reads = []
    real = reader.read
    monkeypatch.setattr(reader, "read", lambda name: reads.append(name) or real(name))
    out = tmp_path / "direct"
    out.mkdir()
    writer.write(plan, reader, out, opts, lambda n: None)
    assert reads.count(FUSED) == 1  # both outputs from one decode

    # through the CLI: verification reassembles the fused module from the two tensors
    r = cli("repack", src, tmp_path / "out", "--target", "gguf", "--json")
    assert r.code == 0, r.err
    assert r.json()["verified"] is True
    stored = {t.name: t for t in gguf.GGUFReader(tmp_path / "out" / "model.gguf").tensors}
    ref = load_file(FIXTURES / "w4a16-g128" / "reference.safetensors")  # the library's own decompression
    for gguf_name, hf in (("blk.0.ffn_gate.weight", "gate_proj"), ("blk.0.ffn_up.weight", "up_proj")):
        t = stored[gguf_name]
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type))))
        assert equal_bits(got.to(torch.bfloat16), ref[f"model.layers.0.mlp.{hf}.weight"])
    assert cli("verify", src, tmp_path / "out").code == 0


def test_a_changed_row_of_a_split_tensor_is_found(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "ToySplitForCausalLM", ToySplitModel)
    src = _fused_source(tmp_path)
    out = tmp_path / "out"
    assert cli("repack", src, out, "--target", "gguf", "--no-verify", "-q").code == 0
    t = next(t for t in gguf.GGUFReader(out / "model.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    with open(out / "model.gguf", "r+b") as f:
        f.seek(int(t.data_offset) + 2)  # the first code byte of the first Q4_0 block of up's row 0
        byte = f.read(1)[0]
        f.seek(int(t.data_offset) + 2)
        f.write(bytes([byte ^ 0x11]))
    r = cli("verify", src, out, "--json")
    assert r.code == 1
    assert [x["module"] for x in r.json()["results"] if not x["ok"]] == [FUSED]
