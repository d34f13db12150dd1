"""llama.cpp end to end (opt-in: CT_CONVERT_ENGINE_TESTS=1 and llama-cpp-python 0.3.36 installed; the
README's GGUF section says how, also against a prebuilt libllama with LLAMA_CPP_LIB_PATH).

Every architecture: the tiny models built by fixtures/gguf/make_gguf_fixtures.py (llama, qwen2, qwen3,
qwen3moe; with a locally trained BPE tokenizer) and every checkpoint of fixtures/gguf (made by
make_arch_fixtures.py), repacked to GGUF, run by llama.cpp and compared with transformers in float32
on the compressed-tensors library's exact dequantized weights (the text model, experts fused into
transformers' layout), on 24 fixed token ids fed directly (the tiny tokenizers are not tokenized).
Error = max|llama.cpp - transformers| / max|transformers| over all positions' logits, for:

* `f32`: an all-F32 copy of our GGUF (`f32_copy`, gguf-py's dequantizers): names, shapes,
  orientation, row orders, hyper-parameters. Must be below EXACT;
* `quant`: our GGUF as written (Q4_0/Q5_0/Q8_0 blocks): llama.cpp rounds activations to Q8 before
  its integer dot products (and in a MoE that can flip a near-tied top-k choice): below QUANT;
* deliberately corrupted F32 copies, each one layout mistake: `rows2` two rows of the first
  attention projection swapped; `rope` every q/k row in llama's rope order where the file holds
  the other one (or reversed); `experts` experts 0 and 1 of the first stacked up-projection
  swapped. Each must be above EXACT.

Measured (llama-cpp-python 0.3.36, llama.cpp 0c1e5709 on CPU, 2 threads; printed by each case):

    model                           f32      quant    rows2    rope     experts
    llama W4A16                     6.3e-7   0.011    0.023    0.036    -
    llama W4A16_ASYM                4.3e-7   0.013    0.031    0.037    -
    llama W8A16                     4.8e-7   0.010    0.027    0.035    -
    qwen2 W4A16                     5.9e-7   0.0056   0.0044   0.018    -
    qwen3 W4A16                     5.1e-7   0.011    0.20     0.40     -
    qwen3moe W4A16 (= fixture)      4.9e-7   0.012    0.18     0.50     0.18
    phi3-w4a16                      3.2e-7   0.0059   0.0052   -        -
    mistral3-w4a16                  3.5e-7   0.0080   0.0071   0.0088   -
    llama4-text-interleaved-w4a16   5.4e-7   0.011    0.19     0.33     0.048
    deepseek-v3-w4a16               5.1e-5   0.0096   0.11     -        0.40
    kimi-k2-w4a16-g32               3.3e-7   0.0033   0.25     -        0.21
    glm4moe-mixed-w8a16-w4a16       4.3e-7   0.0047   0.0027   0.0042   0.0049
    gemma3-text / -vl -w4a16-g32    5.8e-4   0.037    1.0      1.2      -

So EXACT = 1e-4 sits 160x above the worst correct file (but DeepSeek-V3's MLA, 2x: its first
position matches to 3.9e-7, later ones differ by ~3e-5, not from the mscale or YaRN range; probably llama.cpp's absorbed-MLA float32 order) and 27x
below the smallest corruption; models with a GELU MLP (Gemma-3) get EXACT_GELU.
The quantized comparison cannot tell a layout mistake from activation rounding in these tiny
random models (corruptions from 0.0027, rounding up to 0.037): it is a sanity bound (QUANT = 5e-2,
1e-1 with experts), and the F32 copy, made from our file's blocks, carries the exactness check.
A fixture whose architecture has no class is skipped with that reason and runs once one is
registered; two cannot run in llama.cpp 0.3.36 (ENGINE_CANNOT_RUN). A split GGUF
(`--max-shard-size`) loaded from its first part gives the single file's logits bit for bit.
"""

import json
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

BUILT = [("llama", "W4A16"), ("llama", "W4A16_ASYM"), ("llama", "W8A16"), ("qwen2", "W4A16"), ("qwen3", "W4A16"), ("qwen3moe", "W4A16")]
ARCH_FIXTURES = sorted(p.name for p in (FIXTURES / "gguf").iterdir() if (p / "config.json").is_file())
EXACT = 1e-4
EXACT_GELU = 1e-2  # ggml's CPU GELU reads a float16 table (Gemma-3's F32 copy: 5.8e-4 here, ~3e-3 over 50 positions)
QUANT, QUANT_MOE = 5e-2, 1e-1
N_IDS = 24  # longer than Gemma-3's fixture sliding window (16), shorter than any context
CORRUPT = ("blk.0.attn_k.weight", "blk.0.attn_qkv.weight", "blk.0.attn_kv_a_mqa.weight")  # the first present gets two rows swapped


# llama.cpp 0.3.36 aborts (GGML_ASSERT "tensor buffer not set") on a llama4 graph without a NoPE
# layer, fewer than 4 layers: the attention-temperature input is set but never used, so never
# allocated. Real Llama-4 models have 48; llama4-text-interleaved-w4a16 (4 layers) runs instead.
# llama.cpp 0.3.36 takes a deepseek2 model for V2-Lite (no q_lora_rank) only by its layer count (26 or 27).
ENGINE_CANNOT_RUN = {
    "llama4-w4a16": "llama.cpp 0.3.36 aborts on a llama4 model of fewer than 4 layers (unallocated attention-temperature input)",
    "deepseek-v2-lite-w4a16-g32": "llama.cpp 0.3.36 needs deepseek2.attention.q_lora_rank unless the model has V2-Lite's 26 or 27 layers",
}


def _registered(name: str):
    from ct_convert import architectures

    config = json.loads((FIXTURES / "gguf" / name / "config.json").read_text())
    if name in ENGINE_CANNOT_RUN:
        return pytest.mark.skip(reason=ENGINE_CANNOT_RUN[name])
    if architectures.lookup(config) is None:
        return pytest.mark.skip(reason=f"{architectures.hf_architecture(config)}: its GGUF architecture class is not on this branch yet")
    return ()


ARCH_CASES = [pytest.param(name, marks=_registered(name)) for name in ARCH_FIXTURES]


def _build(arch, preset, out):
    sys.path.insert(0, str(FIXTURES / "gguf"))
    from make_gguf_fixtures import build

    build(arch, preset, str(out))


def _text_config(src):
    """The text model's transformers config (a multimodal model's text_config; Kimi-K2 as DeepSeek-V3,
    its remote-code class being only a renamed copy)."""
    import transformers

    raw = json.loads((src / "config.json").read_text())
    if raw.get("model_type") == "kimi_k2":
        keep = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "quantization_config", "architectures")}
        return transformers.DeepseekV3Config(**keep)
    cfg = transformers.AutoConfig.from_pretrained(src)
    return getattr(cfg, "text_config", None) or cfg


def _fuse_experts(sd: dict, transposed: bool) -> None:
    """Per-expert Linears -> transformers' fused experts: gate_up_proj [E, 2I, H] and down_proj
    [E, H, I], or Llama-4's transposed [E, H, 2I] and [E, I, H]."""
    import re

    per_expert = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    groups: dict[str, dict] = {}
    for name in [n for n in sd if per_expert.match(n)]:
        prefix, e, proj = per_expert.match(name).groups()
        groups.setdefault(prefix, {})[(int(e), proj)] = sd.pop(name)
    for prefix, parts in groups.items():
        n = 1 + max(e for e, _ in parts)
        if transposed:
            sd[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")].T, parts[(e, "up")].T], dim=1) for e in range(n)])
            sd[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")].T for e in range(n)])
        else:
            sd[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)])
            sd[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])


def hf_logits(src, ids):
    """transformers in float32 on the exact dequantized weights of the text model."""
    import transformers

    from ct_convert.readers.checkpoint import open_checkpoint
    from ct_convert.source import resolve

    reader = open_checkpoint(resolve(str(src)))
    cfg = _text_config(src)
    cfg.quantization_config = None
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    sd = {f"{m}.weight": reader.read(m).dequantize(torch.float32) for m in reader.modules}
    sd.update({t: reader.get(t).float() for t in reader.passthrough() if not reader.is_quantization_param(t)})
    sd = {n.removeprefix("language_model."): v for n, v in sd.items()}
    sd = {n: v for n, v in sd.items() if n.startswith(("model.", "lm_head.")) and not n.endswith("rotary_emb.inv_freq")}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    _fuse_experts(sd, transposed=cfg.model_type.startswith("llama4"))
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def f32_copy(src, dst, mutate=None):
    """The same GGUF with every tensor dequantized to F32 by gguf-py; `mutate(name, array)` may
    change a tensor (numpy order)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith(("GGUF.", "split.")) or name == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, f.contents(), f.types[0], sub_type=sub)
    for t in r.tensors:
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        if qtype == gguf.GGMLQuantizationType.BF16:
            arr = (np.array(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.array(gguf.quants.dequantize(t.data, qtype), dtype=np.float32)
        arr = arr.reshape([int(x) for x in reversed(t.shape)])
        w.add_tensor(t.name, mutate(t.name, arr) if mutate else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def corruptions(gguf_path, head_dim: int) -> dict:
    """Layout mistakes to make in the F32 copy, those that apply to this model: two rows of the first
    attention projection swapped; every q/k row in llama's rope order where the file has the other
    (or the reverse); experts 0 and 1 of the first stacked up-projection swapped."""
    import gguf

    from ct_convert.architectures.base import rope_rows

    names = {t.name for t in gguf.GGUFReader(gguf_path).tensors}
    found = {}
    first = next(n for n in CORRUPT if n in names)

    def rows2(name, arr):
        if name == first:
            arr = arr.copy()
            arr[..., [0, 1], :] = arr[..., [1, 0], :]
        return arr

    found["rows2"] = rows2
    if "blk.0.attn_q.weight" in names and "blk.0.attn_k.weight" in names:

        def rope(name, arr):
            if name.endswith((".attn_q.weight", ".attn_k.weight")):
                return arr[rope_rows(arr.shape[0], arr.shape[0] // head_dim).numpy()].copy()
            return arr

        found["rope"] = rope
    stacked = sorted(n for n in names if n.endswith("ffn_up_exps.weight"))
    if stacked:

        def experts(name, arr):
            if name == stacked[0]:
                arr = arr.copy()
                arr[[0, 1]] = arr[[1, 0]]
            return arr

        found["experts"] = experts
    return found


def llama_logits(path, ids):
    from llama_cpp import Llama

    llm = Llama(str(path), logits_all=True, type_k=0, type_v=0, n_ctx=64, n_threads=2, verbose=False)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)])
    llm.close()
    return out


def token_ids(gguf_path, n=N_IDS):
    """Token ids every side can embed (below the GGUF's vocabulary, which llama.cpp sizes the
    embedding check by), fixed by a seed; fed directly, the tiny tokenizers are not tokenized."""
    import gguf

    f = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.tokens")
    n_vocab = len(f.data) if f is not None else None
    rows = next(int(t.shape[1]) for t in gguf.GGUFReader(gguf_path).tensors if t.name == "token_embd.weight")
    return np.random.default_rng(0).integers(0, min(rows, n_vocab or rows), size=n).tolist()


def rel(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _repack(cli, src, out, *opts):
    r = cli("repack", src, out, "--target", "gguf", "--json", *opts)
    assert r.code == 0, r.err
    return r


def _check(tmp_path, src, gguf_path, moe: bool, exact: float = EXACT):
    ids = token_ids(gguf_path)
    ref = hf_logits(src, ids)
    f32 = tmp_path / "f32.gguf"
    f32_copy(gguf_path, f32)
    errors = {"f32": rel(llama_logits(f32, ids), ref), "quant": rel(llama_logits(gguf_path, ids), ref)}
    cfg = _text_config(src)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for kind, mutate in corruptions(gguf_path, head_dim).items():
        bad = tmp_path / f"{kind}.gguf"
        f32_copy(gguf_path, bad, mutate)
        errors[kind] = rel(llama_logits(bad, ids), ref)
    print(f"relative max error: { {k: float(f'{v:.2g}') for k, v in errors.items()} }")
    assert errors["f32"] < exact, errors
    assert errors["quant"] < (QUANT_MOE if moe else QUANT), errors
    assert all(v > exact for k, v in errors.items() if k not in ("f32", "quant")), errors


@pytest.mark.parametrize("arch,preset", BUILT)
def test_llama_cpp_logits_match_transformers(cli, tmp_path, arch, preset):
    pytest.importorskip("llama_cpp")
    src = tmp_path / "src"
    _build(arch, preset, src)
    assert _repack(cli, src, tmp_path / "out").json()["unconverted"] == []
    _check(tmp_path, src, tmp_path / "out" / "model.gguf", moe=arch == "qwen3moe")


@pytest.mark.parametrize("name", ARCH_CASES)
def test_every_architecture_fixture_matches_transformers(cli, tmp_path, name):
    pytest.importorskip("llama_cpp")
    src = FIXTURES / "gguf" / name
    _repack(cli, src, tmp_path / "out")
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config") or config
    moe = any(text.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
    gelu = str(text.get("hidden_activation") or text.get("hidden_act")).startswith("gelu")
    _check(tmp_path, src, tmp_path / "out" / "model.gguf", moe=moe, exact=EXACT_GELU if gelu else EXACT)


def test_llama_cpp_loads_a_split_gguf(cli, tmp_path):
    """`--max-shard-size` parts, loaded from the first: the same logits, bit for bit, as the single file."""
    pytest.importorskip("llama_cpp")
    src = FIXTURES / "gguf" / "qwen3moe-w4a16"
    _repack(cli, src, tmp_path / "whole")
    _repack(cli, src, tmp_path / "split", "--max-shard-size", "100KB")
    parts = sorted((tmp_path / "split").glob("*.gguf"))
    assert len(parts) >= 3 and parts[0].name == f"model-00001-of-{len(parts):05d}.gguf"
    ids = token_ids(tmp_path / "whole" / "model.gguf")
    whole = llama_logits(tmp_path / "whole" / "model.gguf", ids)
    split = llama_logits(parts[0], ids)
    assert np.array_equal(split, whole)
    assert rel(split, hf_logits(src, ids)) < QUANT_MOE
