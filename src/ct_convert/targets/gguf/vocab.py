"""Tokenizer metadata (gguf.md §3.6): copied from an existing GGUF (`--vocab-from`), built from a
byte-level BPE `tokenizer.json`, or `none` when the source carries no tokenizer at all."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ct_convert.errors import InputError, UnsupportedConversion
from ct_convert.targets.gguf.pre_tokenizers import CHECK_TEXT, PRE_BY_HASH

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_HINT = "Pass --vocab-from FILE.gguf (a GGUF of the same base model) to take its vocabulary."


@dataclass
class Vocab:
    """KV pairs to write: (key, value, value type, array element type)."""

    pairs: list[tuple] = field(default_factory=list)
    special: gguf.SpecialVocab | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Copied:
    """The tokenizer keys of a --vocab-from GGUF."""

    path: Path
    fields: list


def load(source: Path, config: dict, n_vocab: int, copied: Copied | None, strict: bool) -> Vocab:
    if copied is not None:
        return _copied(copied, n_vocab)
    if (source / "tokenizer.json").is_file():
        return _bpe(source, config, n_vocab, strict)
    _refuse_other_tokenizers(source)
    return Vocab([(gguf.Keys.Tokenizer.MODEL, "none", gguf.GGUFValueType.STRING, None)],
                 notes=["the source has no tokenizer files: the GGUF has no vocabulary (tokenizer model 'none'); "
                        "llama.cpp can run it on token ids only. Use --vocab-from FILE.gguf to add one"])  # fmt: skip


def survey(source: Path, vocab_from: Path | None) -> str | None:
    """For `inspect`: what only `load` can decide about the vocabulary, or None; refuses what the
    tokenizer files present already rule out."""
    if vocab_from is not None:
        return "the vocabulary of --vocab-from"
    if not source.is_dir():  # a Hub repo inspected from its headers: its tokenizer files are not read
        return "the tokenizer files (not downloaded by inspect)"
    if (source / "tokenizer.json").is_file():
        return "the conversion of tokenizer.json (byte-level BPE only)"
    _refuse_other_tokenizers(source)
    return None


def _refuse_other_tokenizers(source: Path) -> None:
    present = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    if present:
        raise UnsupportedConversion(
            f"{source / present[0]}: only a byte-level BPE tokenizer.json can be converted to GGUF here", hint=_HINT
        )


def read_vocab_from(path: Path) -> Copied:
    """The tokenizer keys of a --vocab-from GGUF, refusing an unreadable one."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable GGUF file ({e})", hint=_HINT) from None
    fields = [f for name, f in reader.fields.items() if name.startswith("tokenizer.")]
    if not any(f.name == gguf.Keys.Tokenizer.MODEL for f in fields):
        raise InputError(f"{path}: has no tokenizer.ggml.model key: no vocabulary to copy")
    return Copied(path, fields)


def _copied(copied: Copied, n_vocab: int) -> Vocab:
    path = copied.path
    pairs = []
    n_tokens = None
    for f in copied.fields:
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        value = f.contents()
        if f.name == gguf.Keys.Tokenizer.LIST:
            n_tokens = len(value)
        pairs.append((f.name, value, vtype, sub))
    if n_tokens is not None and n_tokens != n_vocab:
        raise UnsupportedConversion(
            f"{path}: its vocabulary has {n_tokens} tokens but the model's embedding has {n_vocab} rows",
            hint="Take the vocabulary from a GGUF of the same base model.",
        )
    return Vocab(pairs, notes=[f"vocabulary, special tokens and chat template copied from {path.name}"])


def _bpe(source: Path, config: dict, n_vocab: int, strict: bool) -> Vocab:
    import tokenizers

    path = source / "tokenizer.json"
    try:
        raw = json.loads(path.read_text())
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise InputError(f"{path}: cannot read the tokenizer ({e})", hint=_HINT) from None
    model = raw.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(raw.get("pre_tokenizer")):
        raise UnsupportedConversion(
            f"{path}: a {model.get('type')} tokenizer without a ByteLevel pre-tokenizer; only byte-level BPE converts here",
            hint=_HINT,
        )
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise UnsupportedConversion(f"{path}: token ids reach {max(vocab.values())} but the embedding has {n_vocab} rows")
    added = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        if text in added:
            types[i] = gguf.TokenType.CONTROL if added[text] else gguf.TokenType.USER_DEFINED
        else:
            types[i] = gguf.TokenType.NORMAL
    fingerprint = hashlib.sha256(str(tok.encode(CHECK_TEXT).ids).encode()).hexdigest()
    pre = PRE_BY_HASH.get(fingerprint)
    notes = []
    if pre is None:
        if strict:
            raise UnsupportedConversion(
                f"{path}: pre-tokenizer not recognized (fingerprint {fingerprint[:16]}…): llama.cpp would split text differently",
                hint=_HINT + " Without --strict it is written with llama.cpp's 'default' pre-tokenizer.",
            )
        pre = "default"
        notes.append(
            f"pre-tokenizer not recognized (fingerprint {fingerprint[:16]}…): written as 'default'; llama.cpp may split "
            "text differently from the source tokenizer (use --vocab-from FILE.gguf to avoid this)"
        )
    logging.getLogger("gguf").setLevel(logging.ERROR)  # SpecialVocab logs every key it finds
    special = gguf.SpecialVocab(source, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise UnsupportedConversion(f"{path}: a BPE tokenizer without merges", hint=_HINT)
    T, V = gguf.Keys.Tokenizer, gguf.GGUFValueType
    pairs = [
        (T.MODEL, "gpt2", V.STRING, None),
        (T.PRE, pre, V.STRING, None),
        (T.LIST, tokens, V.ARRAY, V.STRING),
        (T.TOKEN_TYPE, [int(t) for t in types], V.ARRAY, V.INT32),
    ]
    return Vocab(pairs, special=special, notes=notes)


def add(w: gguf.GGUFWriter, vocab: Vocab) -> None:
    for key, value, vtype, sub in vocab.pairs:
        w.add_key_value(key, value, vtype, sub_type=sub)
    if vocab.special is not None:
        vocab.special.add_to_gguf(w, quiet=True)
