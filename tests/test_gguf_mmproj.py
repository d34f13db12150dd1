"""The vision tower's mmproj file (`--target gguf` on multimodal sources) beyond the comparison with
llama.cpp's converter (test_gguf_llamacpp.py): a quantized tower module, a tower that is not written
(said on stderr and in the manifest, never silently), `verify` reading the mmproj back, and
(opt-in: CT_CONVERT_ENGINE_TESTS=1 with llama-cpp-python 0.3.36) llama.cpp's libmtmd loading it."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, equal_bits
from test_gguf_writer import hf_rows

MISTRAL3 = FIXTURES / "gguf" / "mistral3-w4a16"
TEXT_Q = "language_model.model.layers.0.self_attn.q_proj"
TOWER_Q = "vision_tower.transformer.layers.0.attention.q_proj"


def with_quantized_tower_q(tmp_path):
    """Mistral-3 with its first vision q_proj quantized as the text q_proj is (the same packed
    tensors: both are [64, 64]) and removed from `ignore`; the library's decompression of those
    tensors is the fixture's reference for the text q_proj."""
    src = tmp_path / "src"
    shutil.copytree(MISTRAL3, src)
    tensors = load_file(src / "model.safetensors")
    del tensors[f"{TOWER_Q}.weight"]
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        tensors[f"{TOWER_Q}.{suffix}"] = tensors[f"{TEXT_Q}.{suffix}"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["ignore"].remove(TOWER_Q)
    (src / "config.json").write_text(json.dumps(cfg))
    return src, load_file(MISTRAL3 / "reference.safetensors")[f"{TEXT_Q}.weight"]


def test_a_quantized_tower_module_keeps_its_block_type(cli, tmp_path):
    src, reference = with_quantized_tower_q(tmp_path)
    out = tmp_path / "out"
    r = cli("repack", src, out, "--target", "gguf", "--json")
    assert r.code == 0, r.err
    manifest = json.loads((out / "ct-convert.json").read_text())
    entry = manifest["modules"][TOWER_Q]
    assert (entry["status"], entry["tensor"], entry["type"], entry["verified"]["exact"]) == ("converted", "v.blk.0.attn_q.weight", "Q4_0", True)
    assert set(manifest["files"]) == {"model.gguf", "mmproj-model.gguf"}
    t = {t.name: t for t in gguf.GGUFReader(out / "mmproj-model.gguf").tensors}["v.blk.0.attn_q.weight"]
    assert gguf.GGMLQuantizationType(t.tensor_type).name == "Q4_0"
    stored = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.Q4_0)))
    # Pixtral's q/k rows in llama.cpp's rope order with the vision tower's 2 heads (LlavaVisionModel)
    assert equal_bits(hf_rows(stored, 2).to(torch.bfloat16), reference)
    inspected = {m["name"]: m for m in cli("inspect", src, "--json", "--modules").json()["modules"]}
    assert inspected[TOWER_Q]["targets"]["gguf"] is not False


def unsupported_tower(tmp_path, key="hidden_act", value="relu"):
    src = tmp_path / "src"
    shutil.copytree(MISTRAL3, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"][key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("mode, key, value, why", [
    ("--json", "hidden_act", "relu", "hidden_act 'relu'"),  # llama.cpp's pixtral graph runs gelu or silu
    ("--quiet", "hidden_act", "relu", "hidden_act 'relu'"),
    ("--json", "num_hidden_layers", 10**9, "num_hidden_layers is 1000000000, but the tower's tensors hold layers 0..2"),
    ("--json", "num_attention_heads", 3, "rows do not split into the tower's heads"),
])  # fmt: skip
def test_a_tower_not_written_is_said_on_stderr_and_in_the_manifest(cli, tmp_path, mode, key, value, why):
    """A tower llama.cpp's graph cannot run as configured, or whose config does not fit its tensors:
    the text model is written, the tower is listed in dropped_tensors, and the reason is a manifest
    note and a warning on stderr whatever the output mode."""
    out = tmp_path / "out"
    r = cli("repack", unsupported_tower(tmp_path, key, value), out, "--target", "gguf", mode)
    assert r.code == 0, r.err
    warnings = [line for line in r.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "vision tower" in warnings[0] and why in warnings[0] and "mmproj-model.gguf" in warnings[0]
    manifest = json.loads((out / "ct-convert.json").read_text())
    assert any("vision tower" in n and why in n for n in manifest["notes"])
    assert {"vision_tower.patch_conv.weight", "multi_modal_projector.linear_1.weight"} <= set(manifest["dropped_tensors"])
    assert sorted(p.name for p in out.iterdir()) == ["ct-convert.json", "model.gguf"]
    names = [t.name for t in gguf.GGUFReader(out / "model.gguf").tensors]
    assert "blk.0.attn_q.weight" in names and not any(n.startswith(("v.", "mm.")) for n in names)


def test_strict_refuses_a_tower_it_cannot_write(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("repack", unsupported_tower(tmp_path), out, "--target", "gguf", "--strict")
    assert r.code == 2 and "relu" in r.err and "--strict" in r.err and not out.exists()


def corrupt(path, tensor: str) -> None:
    """Flip one bit of a tensor's first stored byte."""
    t = {t.name: t for t in gguf.GGUFReader(path).tensors}[tensor]
    with open(path, "r+b") as f:
        f.seek(t.data_offset)
        byte = f.read(1)[0]
        f.seek(t.data_offset)
        f.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("tensor, source", [
    ("v.blk.1.attn_out.weight", "vision_tower.transformer.layers.1.attention.o_proj.weight"),
    ("v.blk.0.attn_k.weight", "vision_tower.transformer.layers.0.attention.k_proj.weight"),
    ("v.token_embd.img_break", "language_model.model.embed_tokens.weight"),
])  # fmt: skip
def test_verify_reads_the_mmproj_back(cli, tmp_path, tensor, source):
    out = tmp_path / "out"
    assert cli("repack", MISTRAL3, out, "--target", "gguf", "--quiet").code == 0
    r = cli("verify", MISTRAL3, out, "--json")
    assert r.code == 0, r.err
    checked = {x["module"] for x in r.json()["results"]}
    assert {source, "vision_tower.patch_conv.weight", "multi_modal_projector.norm.weight"} <= checked
    corrupt(out / "mmproj-model.gguf", tensor)
    r = cli("verify", MISTRAL3, out, "--json")
    assert r.code == 1
    assert [x["module"] for x in r.json()["results"] if not x["ok"]] == [source]
    r = cli("verify", "--manifest", out, "--json")
    assert r.code == 1 and [p["file"] for p in r.json()["problems"]] == ["mmproj-model.gguf"]


def hf_image_features(cli, src, dense, pixels: np.ndarray) -> np.ndarray:
    """transformers' projected image features (float32) for RGB `pixels`, rescaled and normalized
    as the preprocessor says, on the exact dequantized weights (`--target dense`)."""
    import transformers

    assert cli("repack", src, dense, "--target", "dense", "--quiet").code == 0
    pre = json.loads((src / "preprocessor_config.json").read_text())
    x = (pixels.astype(np.float32) / 255 - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    model = transformers.AutoModelForImageTextToText.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(x).permute(2, 0, 1)[None])
    return getattr(out, "pooler_output", out)[0].numpy()  # transformers 5: the projected features


@pytest.mark.engine
@pytest.mark.skipif(os.environ.get("CT_CONVERT_ENGINE_TESTS") != "1", reason="set CT_CONVERT_ENGINE_TESTS=1")
@pytest.mark.parametrize("name, image_tokens", [
    # libmtmd scales the 64x64 image up to its 8192-pixel minimum (96x96): 6x6 patches merged 2x2,
    # and one [IMG_BREAK] after each row of 3 but the last
    ("mistral3-w4a16", 3 * 3 + 2),
    ("gemma3-vl-w4a16-g32", 4),  # mm_tokens_per_image
    # loaded only: the fixture's tiny tower cannot encode an image, in llama.cpp as in transformers
    # (pixel shuffle gives 4 x hidden_size 32 = 128 features, its vision_adapter fc1 takes 64)
    ("llama4-w4a16", None),
])  # fmt: skip
def test_llama_cpp_loads_the_mmproj_and_encodes_an_image(cli, tmp_path, name, image_tokens):
    """llama.cpp's own multimodal library (libmtmd of llama-cpp-python 0.3.36) loads the text model
    and our mmproj file, and turns a 64x64 image into finite embeddings of the text width; Gemma-3's
    equal transformers' on the dequantized model."""
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    src = FIXTURES / "gguf" / name
    out = tmp_path / "out"
    assert cli("repack", src, out, "--target", "gguf", "--quiet").code == 0
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(out / "model.gguf").encode(), llama_cpp.llama_model_default_params())
    assert model
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.warmup, params.print_timings, params.n_threads = False, False, False, 1
    ctx = mtmd.mtmd_init_from_file(str(out / "mmproj-model.gguf").encode(), model, params)
    assert ctx, "libmtmd refused the mmproj file"
    try:
        if image_tokens is None:
            return
        side = 64
        pixels = (ctypes.c_uint8 * (side * side * 3))(*((7 * i) % 256 for i in range(side * side * 3)))
        bitmap = mtmd.mtmd_bitmap_init(side, side, pixels)
        prompt = b"look: " + mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(prompt, len(prompt), True, True)
        chunks = mtmd.mtmd_input_chunks_init()
        assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap), 1) == 0
        images = [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        assert len(images) == 1
        n = mtmd.mtmd_input_chunk_get_n_tokens(images[0])
        assert n == image_tokens
        assert mtmd.mtmd_encode_chunk(ctx, images[0]) == 0
        n_embd = llama_cpp.llama_model_n_embd(model)
        embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * n_embd,)).reshape(n, n_embd)
        assert n > 0 and np.isfinite(embd).all() and np.abs(embd).max() > 0
        if name.startswith("gemma3"):  # no resizing at 64x64: transformers sees the same pixels
            want = hf_image_features(cli, src, tmp_path / "dense", np.ctypeslib.as_array(pixels).reshape(side, side, 3))
            # within llama.cpp's activation rounding; a missing 1 + w, a transposed projection or a
            # misnamed tensor moves them by O(1)
            assert np.abs(embd - want).max() <= 5e-3 * np.abs(want).max()
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    finally:
        mtmd.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)


def test_a_tower_saved_under_model_is_the_same_mmproj(cli, tmp_path):
    """transformers 5 saves Gemma-3's tower as `model.vision_tower.…` / `model.multi_modal_projector.…`
    where published checkpoints have no `model.`: both give the same mmproj tensors."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gguf" / "gemma3-vl-w4a16-g32", src)
    tensors = load_file(src / "model.safetensors")
    tower = ("vision_tower.", "multi_modal_projector.")
    save_file({f"model.{k}" if k.startswith(tower) else k: v for k, v in tensors.items()}, src / "model.safetensors", metadata={"format": "pt"})
    for source, out in ((FIXTURES / "gguf" / "gemma3-vl-w4a16-g32", tmp_path / "a"), (src, tmp_path / "b")):
        assert cli("repack", source, out, "--target", "gguf", "--quiet").code == 0
    a, b = ({t.name: np.array(t.data).tobytes() for t in gguf.GGUFReader(tmp_path / o / "mmproj-model.gguf").tensors} for o in "ab")
    assert a == b and len(a) == 23
