"""marlin-24 decoder (compressed-tensors.md §5.12) against an independent encoder.

The encoder below follows targets.md §1.10 and uses the library's own helpers
(`sparse_semi_structured_from_dense_cutlass`, `get_permutations_24`) for the CUTLASS compression,
metadata reordering and the Marlin permutation, so only the decoder is our code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import equal_bits
from ct_convert.errors import InputError
from ct_convert.readers import config as cfg
from ct_convert.readers.formats import marlin24
from ct_convert.readers.formats.base import ModuleTensors, decoder_for
from ct_convert.tensorstore import TensorStore

lib_perm = pytest.importorskip("compressed_tensors.utils.permutations_24")
lib_conv = pytest.importorskip("compressed_tensors.utils.semi_structured_conversions")

MOD = "model.layers.0.mlp.down_proj"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


# -- independent encoder (Marlin24Compressor, own port of its pack steps) -----------------------


def encode(q: torch.Tensor, scale: torch.Tensor, bits: int, strategy: str, gs: int | None) -> dict[str, torch.Tensor]:
    """Signed 2:4 codes q int8 [N, K] + scales [N, G] fp16 -> weight_packed, scale_packed, meta."""
    comp, meta = lib_conv.sparse_semi_structured_from_dense_cutlass(q.to(torch.float16))
    w = comp.t().contiguous().to(torch.int64) + (1 << (bits - 1))  # [K/2, N] unsigned
    size_k, size_n = w.shape
    perm, scale_perm, scale_perm_single = lib_perm.get_permutations_24(bits)
    w = w.reshape(size_k // 16, 16, size_n // 16, 16).permute(0, 2, 1, 3).reshape(size_k // 16, size_n * 16)
    w = w.reshape(-1, perm.numel())[:, perm].reshape(w.shape)
    pf = 32 // bits
    packed = torch.zeros(w.shape[0], w.shape[1] // pf, dtype=torch.int64)
    for i in range(pf):
        packed |= w[:, i::pf] << (bits * i)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    s = scale.t().contiguous()
    if strategy == "group" and gs < size_k:  # the writer's quirk: size_k is K/2
        s = s.reshape(-1, len(scale_perm))[:, scale_perm]
    else:
        s = s.reshape(-1, len(scale_perm_single))[:, scale_perm_single]
    s = s.reshape(-1, size_n).contiguous()
    meta = meta.contiguous().reshape(meta.shape[1] // 2, meta.shape[0] * 2)  # raw resize_
    return {"weight_packed": packed, "scale_packed": s, "meta": meta}


def random_24(n: int, k: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    """int8 [N, K] codes with at most 2 nonzeros per 4 along K (some kept values are 0 too)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    vals = torch.randint(lo, hi + 1, (n, k // 4, 4), generator=gen, dtype=torch.int16)
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    # a few groups with only one or no kept value
    drop = torch.rand(n, k // 4, 4, generator=gen) < 0.05
    return torch.where(mask & ~drop, vals, 0).to(torch.int8).reshape(n, k)


def weights_json(bits: int, strategy: str, gs: int | None) -> dict:
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": strategy,
        "group_size": gs if strategy == "group" else None,
        "dynamic": False,
        "actorder": None,
    }


def make_module(tmp_path: Path, tensors: dict[str, torch.Tensor], bits: int, strategy: str, gs: int | None):
    qc = cfg.parse(
        {
            "quant_method": "compressed-tensors",
            "format": "marlin-24",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights_json(bits, strategy, gs)}},
            "ignore": ["lm_head"],
            "quantization_status": "compressed",
        }
    )
    file = tmp_path / "model.safetensors"
    save_file({f"{MOD}.{k}": v for k, v in tensors.items()}, str(file))
    store = TensorStore(tmp_path, [file])
    return ModuleTensors(
        name=MOD,
        tensors={k: f"{MOD}.{k}" for k in tensors},
        store=store,
        group=qc.groups[0],
        config=qc,
        model_dtype=torch.float16,
    )


def random_scales(n: int, g: int, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, g, generator=gen) * 0.02 + 1e-3).to(torch.float16)


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_permutation_matches_library(bits):
    perm, scale_perm, _ = lib_perm.get_permutations_24(bits)
    assert equal_bits(marlin24.weight_perm_24(bits), perm.to(torch.int64))
    assert list(marlin24._SCALE_PERM) == list(scale_perm)


def test_registered():
    assert isinstance(decoder_for("marlin-24"), marlin24.Marlin24Decoder)


CASES = [
    # bits, N, K, strategy, group size
    (4, 64, 128, "channel", None),
    (4, 128, 256, "group", 128),  # quirk: 128 < K/2 is false -> identity scale order
    (4, 128, 512, "group", 128),  # grouped scale permutation
    (4, 192, 1024, "group", 128),
    (4, 64, 256, "group", 64),
    (4, 256, 384, "channel", None),
    (8, 64, 128, "channel", None),  # 8-bit: UNCONFIRMED against real files
    (8, 128, 512, "group", 128),
]


@pytest.mark.parametrize("bits,n,k,strategy,gs", CASES)
def test_round_trip(tmp_path, bits, n, k, strategy, gs):
    gen = torch.Generator().manual_seed(1000 * bits + n + k)
    q = random_24(n, k, bits, gen)
    g = 1 if strategy == "channel" else -(-k // gs)
    scale = random_scales(n, g, gen)
    mt = make_module(tmp_path, encode(q, scale, bits, strategy, gs), bits, strategy, gs)

    dec = decoder_for("marlin-24")
    info = dec.describe(mt, "marlin-24")
    assert info.shape == (n, k)
    assert info.dtype == torch.float16
    assert info.sparsity == "2:4"
    assert info.scheme.num_bits == bits and info.scheme.strategy == strategy

    qw = dec.decode(mt, info)
    assert qw.codes.dtype == torch.int8
    assert equal_bits(qw.codes, q)
    assert qw.scale.dtype == torch.float16 and qw.scale.shape == (n, g)
    assert equal_bits(qw.scale, scale)
    expect = (q.to(torch.float32) * scale.to(torch.float32).repeat_interleave(k // g, dim=1)[:, :k]).to(torch.float16)
    assert equal_bits(qw.dequantize(), expect)


def test_scale_quirk_is_exercised():
    """K=512 gs=128 stores permuted scales; K=256 gs=128 stores them in natural (transposed) order."""
    gen = torch.Generator().manual_seed(7)
    for k, permuted in ((256, False), (512, True)):
        q = random_24(64, k, 4, gen)
        scale = random_scales(64, k // 128, gen)
        stored = encode(q, scale, 4, "group", 128)["scale_packed"]
        assert equal_bits(stored, scale.t()) is not permuted
        assert marlin24.grouped_scale_perm("group", 128, k) is permuted


def test_expand_matches_library_decoder():
    """Our metadata un-reordering + 2:4 expansion equals the library's CUTLASS to-dense conversion."""
    gen = torch.Generator().manual_seed(3)
    q = random_24(128, 256, 4, gen)
    comp, meta = lib_conv.sparse_semi_structured_from_dense_cutlass(q.to(torch.float16))
    ref = lib_conv.sparse_semi_structured_to_dense_cutlass(comp, meta)
    ours = marlin24.expand_24(comp.to(torch.int8), meta, 128, 256)
    assert equal_bits(ours.to(torch.float16), ref)
    assert equal_bits(ours, q)


def _good(tmp_path, bits=4, n=64, k=256, strategy="group", gs=128):
    gen = torch.Generator().manual_seed(5)
    q = random_24(n, k, bits, gen)
    g = 1 if strategy == "channel" else k // gs
    return encode(q, random_scales(n, g, gen), bits, strategy, gs)


def test_bad_meta_shape(tmp_path):
    t = _good(tmp_path)
    t["meta"] = t["meta"].reshape(-1, 64)
    mt = make_module(tmp_path, t, 4, "group", 128)
    with pytest.raises(InputError, match=rf"{MOD}\.meta.*shape"):
        decoder_for("marlin-24").describe(mt, "marlin-24")


def test_bad_meta_dtype(tmp_path):
    t = _good(tmp_path)
    t["meta"] = t["meta"].to(torch.int32)
    mt = make_module(tmp_path, t, 4, "group", 128)
    with pytest.raises(InputError, match=rf"{MOD}\.meta.*I16"):
        decoder_for("marlin-24").describe(mt, "marlin-24")


def test_bad_scale_groups(tmp_path):
    t = _good(tmp_path)
    t["scale_packed"] = torch.cat([t["scale_packed"], t["scale_packed"]])
    mt = make_module(tmp_path, t, 4, "group", 128)
    with pytest.raises(InputError, match=rf"{MOD}\.scale_packed.*group"):
        decoder_for("marlin-24").describe(mt, "marlin-24")


def test_weight_width_mismatch(tmp_path):
    t = _good(tmp_path)
    mt = make_module(tmp_path, t, 8, "group", 128)  # config says 8-bit, file is 4-bit
    with pytest.raises(InputError, match=rf"{MOD}\.weight_packed"):
        decoder_for("marlin-24").describe(mt, "marlin-24")


def test_n_not_multiple_of_64(tmp_path):
    t = {
        "weight_packed": torch.zeros(8, 64, dtype=torch.int32),
        "scale_packed": torch.ones(2, 32, dtype=torch.float16),
        "meta": torch.zeros(8, 64, dtype=torch.int16),
    }
    mt = make_module(tmp_path, t, 4, "group", 128)
    with pytest.raises(InputError, match="multiple of 64"):
        decoder_for("marlin-24").describe(mt, "marlin-24")


def test_asymmetric_refused(tmp_path):
    t = _good(tmp_path)
    mt = make_module(tmp_path, t, 4, "group", 128)
    mt.group = cfg.SchemeGroup(
        name="g",
        targets=("Linear",),
        weights=cfg.QuantArgs(num_bits=4, symmetric=False, strategy="group", group_size=128),
        input_activations=None,
        output_activations=None,
        format="marlin-24",
    )
    with pytest.raises(InputError, match="symmetric"):
        decoder_for("marlin-24").describe(mt, "marlin-24")


def test_invalid_metadata(tmp_path):
    t = _good(tmp_path)
    t["meta"] = torch.zeros_like(t["meta"])  # every nibble 0b0000: both kept values at index 0
    mt = make_module(tmp_path, t, 4, "group", 128)
    dec = decoder_for("marlin-24")
    qw = dec.decode(mt, dec.describe(mt, "marlin-24"))
    with pytest.raises(InputError, match=rf"{MOD}\.meta.*2:4 metadata"):
        qw.codes


# -- real checkpoints written by compressed-tensors 0.8.1 / 0.14 ---------------------------------


@pytest.mark.parametrize("folder", ["legacy-0.8.1-marlin24", "legacy-0.14-marlin24"])
def test_real_fixture(folder):
    roots = [r for r in (FIXTURES / folder, FIXTURES / "legacy" / folder) if (r / "reference.safetensors").is_file()]
    if not roots or not (roots[0] / "config.json").is_file():
        pytest.skip(f"fixture {folder} not generated")
    root = roots[0]
    config = json.loads((root / "config.json").read_text())
    found = cfg.locate(config)
    assert found, f"{folder}: no quantization config"
    qc = cfg.parse(found[0])
    assert qc.format == "marlin-24"
    files = sorted(p for p in root.glob("*.safetensors") if p.name != "reference.safetensors")
    store = TensorStore(root, files)
    reference = load_file(str(root / "reference.safetensors"))
    modules = sorted({n[: -len(".weight_packed")] for n in store.names if n.endswith(".weight_packed")})
    assert modules, f"{folder}: no marlin-24 modules"
    groups = [g for g in qc.groups if g.weights is not None]
    assert len(groups) == 1, "fixture is expected to have one weight group"
    dec = decoder_for("marlin-24")
    checked = 0
    for mod in modules:
        if f"{mod}.weight" not in reference:
            continue
        mt = ModuleTensors(
            name=mod,
            tensors={s: f"{mod}.{s}" for s in ("weight_packed", "scale_packed", "meta")},
            store=store,
            group=groups[0],
            config=qc,
            model_dtype=torch.float16,
        )
        info = dec.describe(mt, "marlin-24")
        w = dec.decode(mt, info).dequantize()
        ref = reference[f"{mod}.weight"]
        assert w.shape == ref.shape, mod
        assert equal_bits(w, ref.to(w.dtype)), mod
        checked += 1
    assert checked, f"{folder}: reference.safetensors holds none of the marlin-24 modules"
