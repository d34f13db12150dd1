"""llama.cpp end to end (opt-in: CT_CONVERT_ENGINE_TESTS=1 and llama-cpp-python installed).

One tiny model per architecture, with a locally trained BPE tokenizer, quantized by
compressed-tensors, repacked to GGUF, run by llama.cpp and compared with transformers in float32 on
the exact dequantized weights (gguf.md §5.3): an all-F32 copy of the GGUF must match closely (names,
shapes, rope order, hyper-parameters), the quantized GGUF within llama.cpp's activation rounding.
"""

import os
import sys

import numpy as np
import pytest
import torch

from conftest import FIXTURES

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(os.environ.get("CT_CONVERT_ENGINE_TESTS") != "1", reason="set CT_CONVERT_ENGINE_TESTS=1"),
]

CASES = [("llama", "W4A16"), ("llama", "W4A16_ASYM"), ("llama", "W8A16"), ("qwen2", "W4A16"), ("qwen3", "W4A16"), ("qwen3moe", "W4A16")]
TEXT = "The quick brown fox jumps over the lazy dog. 0123 + 45 = ?"


def _build(arch, preset, out):
    sys.path.insert(0, str(FIXTURES / "gguf"))
    from make_gguf_fixtures import build

    build(arch, preset, str(out))


def hf_logits(src, ids):
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
            E = cfg.num_experts
            sd[f"{p}.gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")]) for e in range(E)])
            sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(E)])
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def f32_copy(src, dst):
    """The same GGUF with every tensor dequantized to F32 by gguf-py."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype == gguf.GGMLQuantizationType.BF16:
            arr = (np.array(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.array(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
        w.add_tensor(t.name, arr.reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_logits(path, ids):
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, type_k=0, type_v=0, n_ctx=64, n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    return out


@pytest.mark.parametrize("arch,preset", CASES)
def test_llama_cpp_logits_match_transformers(cli, tmp_path, arch, preset):
    pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    src = tmp_path / "src"
    _build(arch, preset, src)
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    assert r.json()["unconverted"] == []
    ids = Tokenizer.from_file(str(src / "tokenizer.json")).encode(TEXT).ids
    ref = hf_logits(src, ids)
    scale = np.abs(ref).max()
    f32 = tmp_path / "f32.gguf"
    f32_copy(out / "model.gguf", f32)
    exact = llama_logits(f32, ids)
    assert np.abs(exact - ref).max() / scale < 1e-4
    quant = llama_logits(out / "model.gguf", ids)
    # ggml quantizes activations to Q8_0/Q8_1 before the dot product; in a MoE that rounding can also
    # flip a near-tied top-k routing choice, hence the wider bound there
    assert np.abs(quant - ref).max() / scale < (1e-1 if arch == "qwen3moe" else 5e-2)
    assert (quant.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
