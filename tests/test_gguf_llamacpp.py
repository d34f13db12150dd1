"""`--target gguf` against llama.cpp's own converter (expectations in tests/data/llamacpp/, written by
tests/llamacpp_oracle.py from llama-cpp-python 0.3.36's convert_hf_to_gguf.py on the dense equivalent
of each fixture).

Comparison rules (by design our file is not byte-identical to the converter's):
* metadata: every key except `general.*` (name, size label, file type: naming and bookkeeping) must be
  present on both sides with the same GGUF value type and the same value; `general.architecture` too.
* tensors: the same names, the same ggml shapes (ne order, so orientation and stacking are checked),
  and the same values: where ours is a quantized block type its float32 value rounded to bf16 must hash
  like llama.cpp's float32 value rounded to bf16 (both are then the compressed-tensors library's bf16
  decompression); where ours is a float type its float32 value must hash like llama.cpp's.
* types: wherever llama.cpp forces a type in a bf16 file (F32: norms, 1-D, routers; F16: Gemma-3's
  mm.input_projection), ours has that type; elsewhere ours may be a block type (Q4_0, Q5_0, Q8_0, ...)
  or the source float type.

Two deliberate deviations in the mmproj files, whose expectations are adjusted by hand below
(`deviations`): Pixtral's `v.token_embd.img_break`, which clip.cpp requires and the converter fails
to write for HF-layout checkpoints, and Gemma-3's `mm.input_projection` in F32 where F16 would round
source values.
"""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llamacpp_oracle import DATA, FIXTURES as ORACLE_FIXTURES, compare_metadata, compare_tensors, fixture_source, read_ours, sha_f32, values_f32

NOT_YET = pytest.mark.xfail(strict=True, reason="architecture class not yet added")
KNOWN = {"gguf-llama-w4a16": (), "gguf-llama-hftok-w4a16": (), "phi3-w4a16": (), "mistral3-w4a16": (), "gemma3-text-w4a16-g32": (), "gemma3-vl-w4a16-g32": (), "glm4moe-mixed-w8a16-w4a16": (), "deepseek-v3-w4a16": (), "deepseek-v2-lite-w4a16-g32": (), "kimi-k2-w4a16-g32": (), "llama4-w4a16": (), "llama4-text-interleaved-w4a16": (), "gguf-qwen2-w4a16": (), "gguf-qwen3-w4a16": (), "qwen3moe-w4a16": ()}
CASES = [pytest.param(name, marks=KNOWN.get(name, NOT_YET)) for name in ORACLE_FIXTURES]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = fixture_source(name)
        return made[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_matches_llama_cpp_converter(cli, tmp_path, sources, name):
    want = json.loads((DATA / f"{name}.json").read_text())
    out = tmp_path / "out"
    r = cli("repack", sources(name), out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    mine = read_ours(out / "model.gguf")
    problems = compare_metadata(mine["metadata"], want["text"]["metadata"])
    problems += compare_tensors(mine["tensors"], want["text"]["tensors"])
    assert not problems, "\n".join(problems)


VISION = [pytest.param(name, marks=KNOWN.get(name, NOT_YET)) for name, spec in ORACLE_FIXTURES.items() if spec[1]]


def source_tensor(src, name: str) -> torch.Tensor:
    with safe_open(src / "model.safetensors", "pt") as f:
        return f.get_tensor(name)


def deviations(src, want: dict, mine: dict) -> None:
    """Where ct-convert deliberately writes what llama.cpp's converter does not, the expectation is
    adjusted here, by hand, from the source tensors (read with safetensors, not by ct-convert)."""
    tensors = want["tensors"]
    if want["metadata"]["clip.projector_type"]["value"] == "pixtral":
        # clip.cpp's pixtral projector requires v.token_embd.img_break, the text embedding's row of
        # [IMG_BREAK]; LlavaVisionModel would write it but drops every `language_model.` tensor first,
        # so the converter's file cannot load. ct-convert writes it, 1-D F32 as `data_torch[id]` is.
        added = json.loads((src / "tokenizer.json").read_text())["added_tokens"]
        row = next(t["id"] for t in added if t["content"] == "[IMG_BREAK]")
        value = source_tensor(src, "language_model.model.embed_tokens.weight")[row].to(torch.float32).numpy()
        assert "v.token_embd.img_break" not in tensors
        tensors["v.token_embd.img_break"] = {"shape": [value.shape[0]], "type": "F32", "sha256_f32": sha_f32(value)}
    if "mm.input_projection.weight" in tensors:
        # llama.cpp forces F16; where that rounds a source value (bf16 below 2^-17 has bits F16's
        # subnormals lack) ct-convert writes F32, exact: equal to the source, and rounded to F16
        # equal to what llama.cpp wrote
        source = source_tensor(src, "multi_modal_projector.mm_input_projection_weight")
        if not torch.equal(source.to(torch.float16).to(source.dtype), source):
            ours = values_f32(mine["tensors"]["mm.input_projection.weight"])
            assert sha_f32(ours.astype(np.float16).astype(np.float32)) == tensors["mm.input_projection.weight"]["sha256_f32"]
            exact = source.to(torch.float32).numpy()  # stored as HF holds it, [vision hidden, text hidden]
            tensors["mm.input_projection.weight"].update(type="F32", sha256_f32=sha_f32(exact))


@pytest.mark.parametrize("name", VISION)
def test_mmproj_matches_llama_cpp_converter(cli, tmp_path, sources, name):
    """The vision tower as `convert_hf_to_gguf.py --mmproj` writes it, beside the text model."""
    want = json.loads((DATA / f"{name}.json").read_text())["mmproj"]
    out = tmp_path / "out"
    r = cli("repack", sources(name), out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    mine = read_ours(out / "mmproj-model.gguf")
    deviations(sources(name), want, mine)
    problems = compare_metadata(mine["metadata"], want["metadata"])
    problems += compare_tensors(mine["tensors"], want["tensors"])
    assert not problems, "\n".join(problems)
