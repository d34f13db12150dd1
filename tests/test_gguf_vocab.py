"""Tokenizer metadata against llama.cpp's converter: for every fixture of tests/data/llamacpp/, the
`tokenizer.*` keys vocab.load writes for the converter's architecture equal the converter's own
(keys, GGUF types, values), whatever the tokenizer kind: byte-level BPE tokenizer.json, SentencePiece
tokenizer.model (generic and Phi-3 rules), Kimi's tiktoken.model. Plus the refusals and notes."""

import json
import shutil

import gguf
import pytest

from conftest import FIXTURES
from ct_convert.errors import UnsupportedConversion
from ct_convert.targets.gguf import vocab
from llamacpp_oracle import DATA, FIXTURES as ORACLE_FIXTURES, compare_metadata, fixture_source, read_ours


def write_vocab(voc: vocab.Vocab, arch: str, path):
    w = gguf.GGUFWriter(path, arch)
    vocab.add(w, voc)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return read_ours(path)["metadata"]


@pytest.mark.parametrize("name", list(ORACLE_FIXTURES))
def test_tokenizer_keys_match_llama_cpp(tmp_path, name):
    want = json.loads((DATA / f"{name}.json").read_text())["text"]
    arch = want["metadata"]["general.architecture"]["value"]
    src = fixture_source(name)
    config = json.loads((src / "config.json").read_text())
    n_vocab = want["tensors"]["token_embd.weight"]["shape"][1]
    voc = vocab.load(src, config, n_vocab, None, False, arch)
    mine = write_vocab(voc, arch, tmp_path / "v.gguf")
    problems = compare_metadata(mine, want["metadata"], prefix="tokenizer.")
    assert not problems, "\n".join(problems)


def test_tokenizer_config_alone_gives_no_vocabulary_and_a_note(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    voc = vocab.load(src, {"vocab_size": 64}, 64, None, False, "llama")
    assert voc.kind == "none" and voc.pairs == [(gguf.Keys.Tokenizer.MODEL, "none", gguf.GGUFValueType.STRING, None)]
    assert "only a tokenizer_config.json" in voc.notes[0]


@pytest.mark.parametrize("kind", ["WordPiece", "Unigram"])
def test_other_tokenizer_json_models_are_refused_in_one_line(tmp_path, kind):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gguf" / "qwen3moe-w4a16", src, ignore=shutil.ignore_patterns("*.safetensors"))
    raw = json.loads((src / "tokenizer.json").read_text())
    raw["model"]["type"] = kind
    (src / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedConversion, match=f"tokenizer.json: a {kind}") as e:
        vocab.load(src, {"vocab_size": 320}, 320, None, False, "qwen3moe")
    assert "\n" not in str(e.value)


def test_tiktoken_needs_the_kimi_architecture(tmp_path):
    src = FIXTURES / "gguf" / "kimi-k2-w4a16-g32"
    with pytest.raises(UnsupportedConversion, match="tiktoken.model: this tokenizer cannot be converted"):
        vocab.load(src, json.loads((src / "config.json").read_text()), 556, None, False, "llama")


def test_tiktoken_ranks_must_be_well_formed(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gguf" / "kimi-k2-w4a16-g32", src, ignore=shutil.ignore_patterns("*.safetensors"))
    lines = (src / "tiktoken.model").read_text().splitlines()
    (src / "tiktoken.model").write_text("\n".join(lines[:5] + ["not-base64! 5"] + lines[6:]) + "\n")
    with pytest.raises(Exception, match="line 6 is not 'base64-token rank'"):
        vocab.load(src, json.loads((src / "config.json").read_text()), 556, None, False, "deepseek2")


def test_missing_sentencepiece_is_one_clear_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails as if not installed
    src = FIXTURES / "gguf" / "phi3-w4a16"
    with pytest.raises(UnsupportedConversion, match="needs the sentencepiece package") as e:
        vocab.load(src, json.loads((src / "config.json").read_text()), 400, None, False, "phi3")
    assert "\n" not in str(e.value)


def test_cli_writes_a_no_vocabulary_gguf_for_a_tokenizer_config_alone(cli, tmp_path):
    """Was refused with "only a byte-level BPE tokenizer.json can be converted"."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "w4a16-g128", src)
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ messages }}"}))
    r = cli("repack", src, tmp_path / "out", "--target", "gguf", "--json")
    assert r.code == 0, r.err
    meta = read_ours(tmp_path / "out" / "model.gguf")["metadata"]
    assert meta["tokenizer.ggml.model"]["value"] == "none" and "tokenizer.ggml.tokens" not in meta
    assert any("only a tokenizer_config.json" in n for n in r.json()["notes"])
