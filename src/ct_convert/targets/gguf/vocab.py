"""Tokenizer metadata (gguf.md §3.6), written the way llama.cpp's convert_hf_to_gguf.py writes it for
each architecture (llama-cpp-python 0.3.36, `conversion/base.py` `_set_vocab_*`, `get_vocab_base`):

* `--vocab-from FILE.gguf`: every `tokenizer.*` key copied;
* SentencePiece `tokenizer.model` (model `llama`): pieces from gguf-py's SentencePieceVocab, then the
  converter's overlays (added_tokens.json, added_tokens_decoder, [PAD] padding to vocab_size);
* a byte-level BPE (model `gpt2`): transformers' AutoTokenizer (never remote code) for tokens and
  the pre-tokenizer fingerprint, gguf-py's SpecialVocab for merges, special ids and chat template;
* a byte-fallback BPE `tokenizer.json` converted from SentencePiece (model `llama`): gguf-py's
  LlamaHfVocab;
* Kimi's tiktoken vocabulary (`tiktoken.model`, model `gpt2`, pre `kimi-k2`): merges rebuilt from
  the ranks, the 256 ids after them special;
* none of these but a tokenizer_config.json or no tokenizer file at all: model `none`, with a note.

Which of them an architecture tries, in which order, and its special-token fixes are llama.cpp's
per-class `set_vocab` (`RULES`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ct_convert.errors import InputError, UnsupportedConversion
from ct_convert.jsonfile import load_json
from ct_convert.regular_files import open_regular_file, require_regular
from ct_convert.targets.gguf import header
from ct_convert.targets.gguf.pre_tokenizers import CHECK_TEXT, PRE_BY_HASH

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json", "tokenizer_config.json")
SPECIAL_VOCAB_JSON = ("tokenizer_config.json", "chat_template.json", "config.json")
# what gguf.SpecialVocab opens besides those (it skips what is not a regular file, so a FIFO or device
# there would silently drop the chat template instead of being refused)
SPECIAL_VOCAB_FILES = ("merges.txt", "chat_template.jinja")
_HINT = "Pass --vocab-from FILE.gguf (a GGUF of the same base model) to take its vocabulary."
T, V = gguf.Keys.Tokenizer, gguf.GGUFValueType
_SPM_UNUSED_SCORE = -10000.0  # [PAD] fill inside a SentencePiece vocabulary
_ADDED_SCORE = -1000.0  # added tokens of a SentencePiece vocabulary
KIMI_RESERVED = 256  # Kimi-K2's tokenizer: this many special ids follow the tiktoken ranks


@dataclass
class Vocab:
    """KV pairs to write: (key, value, value type, array element type)."""

    kind: str  # "copied" | "gpt2" | "llama" | "none"
    pairs: list[tuple] = field(default_factory=list)
    special: gguf.SpecialVocab | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Rules:
    """What llama.cpp's `set_vocab` of one architecture does: the vocabulary kinds it tries in order
    (spm, spm_phi3, llama_hf, gpt2, tiktoken), the add_space_prefix it writes after a SentencePiece
    vocabulary, whether it copies tokenizer_config's add_prefix_space, and the special ids it sets
    from added tokens when the files did not."""

    order: tuple[str, ...]
    spm_space_prefix: bool | None = None
    prefix_space_from_config: bool = False
    specials: tuple[tuple[str, str], ...] = ()


RULES = {
    # LlamaModel.set_vocab (also Ministral3Model, the text model of Mistral3ForConditionalGeneration)
    "llama": Rules(("spm", "llama_hf", "gpt2"), prefix_space_from_config=True),
    "mistral3": Rules(("spm", "llama_hf", "gpt2"), prefix_space_from_config=True),
    "qwen2": Rules(("spm", "gpt2")),  # Qwen2Model.set_vocab, inherited by Qwen3Model
    "qwen3": Rules(("spm", "gpt2")),
    "qwen3moe": Rules(("gpt2",)),  # Qwen2MoeModel: TextModel.set_vocab
    "llama4": Rules(("gpt2",)),
    "deepseek2": Rules(("gpt2", "tiktoken")),  # DeepseekV2Model.set_vocab: gpt2, else Kimi's tiktoken
    "gemma3": Rules(("spm", "gpt2"), spm_space_prefix=False),
    # Glm4MoeModel: _set_vocab_glm
    "glm4moe": Rules(("gpt2",), specials=(("bos", "[gMASK]"), ("eot", "<|user|>"), ("unk", "<|endoftext|>"), ("eom", "<|observation|>"))),
    "phi3": Rules(("spm_phi3",)),  # Phi3MiniModel.set_vocab (gpt2 when tokenizer_class is GPT2Tokenizer)
}
DEFAULT_RULES = Rules(("spm", "gpt2", "tiktoken"))


@dataclass
class Copied:
    """The tokenizer keys of a --vocab-from GGUF, read once."""

    path: Path
    fields: list


def load(source: Path, config: dict, n_vocab: int, copied: Copied | None, strict: bool, arch: str | None = None) -> Vocab:
    """The tokenizer of `source` as llama.cpp's converter writes it for `arch` (a llama.cpp arch name),
    or the keys `copied` from --vocab-from."""
    if copied is not None:
        return _copied(copied, n_vocab)
    source = Path(source)
    rules = RULES.get(arch, DEFAULT_RULES)
    size = _vocab_size(config) or n_vocab
    order = rules.order
    if order == ("spm_phi3",) and _tokenizer_class(source) == "GPT2Tokenizer":
        order = ("gpt2",)
    for kind in order:
        voc = _KINDS[kind](source, config, size, strict, rules)
        if voc is not None:
            break
    else:
        return _none(source)
    space = _tokenizer_config(source).get("add_prefix_space") if rules.prefix_space_from_config else None
    if space is not None:  # LlamaModel.set_vocab writes it whatever the vocabulary kind
        voc.pairs.append((T.ADD_PREFIX, bool(space), V.BOOL, None))
    return voc


def survey(source: Path, vocab_from: Path | None) -> str | None:
    """For `inspect`: what only `load` decides about the vocabulary (it converts the tokenizer files,
    which may still be refused), or None where there is nothing to decide."""
    if vocab_from is not None:
        return "the vocabulary of --vocab-from"
    if not Path(source).is_dir():  # a Hub repo inspected from its headers: its tokenizer files are not read
        return "the tokenizer files (not downloaded by inspect)"
    present = [f for f in TOKENIZER_FILES if f != "tokenizer_config.json" and _present(Path(source) / f)]
    return f"the conversion of {present[0]}" if present else None


def _none(source: Path) -> Vocab:
    present = [f for f in TOKENIZER_FILES if _present(source / f)]
    if any(f != "tokenizer_config.json" for f in present):
        raise UnsupportedConversion(f"{source / present[0]}: this tokenizer cannot be converted to GGUF for this architecture", hint=_HINT)
    why = "has only a tokenizer_config.json (no vocabulary file)" if present else "has no tokenizer files"
    return Vocab("none", [(T.MODEL, "none", V.STRING, None)],
                 notes=[f"the source {why}: the GGUF has no vocabulary (tokenizer model 'none'); llama.cpp can run it on "
                        "token ids only. Use --vocab-from FILE.gguf to add one"])  # fmt: skip


def _vocab_size(config: dict) -> int | None:
    """vocab_size as llama.cpp reads it: text_config merged over the top level."""
    merged = {**config, **(config.get("text_config") or {})}
    return int(merged["vocab_size"]) if merged.get("vocab_size") else None


def _present(path: Path) -> bool:
    """Whether a tokenizer file is there; one that is there but is not a regular file is refused."""
    if not os.path.lexists(path):
        return False
    require_regular(path)
    return True


def _tokenizer_config(source: Path) -> dict:
    path = source / "tokenizer_config.json"
    if not _present(path):
        return {}
    return load_json(path)


def _tokenizer_class(source: Path) -> str | None:
    return _tokenizer_config(source).get("tokenizer_class")


def _check_side_files(source: Path) -> None:
    """gguf-py's SpecialVocab and transformers parse these without bounds or checks: refuse a bad one
    here, naming it, before either reads it."""
    for name in SPECIAL_VOCAB_JSON:
        if _present(source / name):
            load_json(source / name)
    for name in SPECIAL_VOCAB_FILES:
        _present(source / name)
    for extra in sorted((source / "additional_chat_templates").glob("*.jinja")):
        require_regular(extra)


def _special_vocab(source: Path, **kw) -> gguf.SpecialVocab:
    logging.getLogger("gguf").setLevel(logging.ERROR)  # SpecialVocab logs every key it finds
    _check_side_files(source)
    try:
        return gguf.SpecialVocab(source, **kw)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        raise InputError(f"{source}: cannot read the special tokens ({e})", hint=_HINT) from None


def looks_special(token: str) -> bool:
    """Added tokens llama.cpp makes CONTROL although not marked special (TextModel.does_token_look_special)."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


# ------------------------------------------------------------------------------------ SentencePiece


def _spm(source: Path, config: dict, size: int, strict: bool, rules: Rules, phi3: bool = False) -> Vocab | None:
    if not _present(source / "tokenizer.model"):
        return None
    try:
        import sentencepiece  # noqa: F401  (gguf.SentencePieceVocab needs it)
    except ImportError:
        raise UnsupportedConversion(
            f"{source / 'tokenizer.model'}: a SentencePiece tokenizer needs the sentencepiece package",
            hint="pip install sentencepiece, or pass --vocab-from FILE.gguf.",
        ) from None
    try:
        spm = gguf.SentencePieceVocab(source)
        pieces = list(spm.sentencepiece_tokens())
    except Exception as e:  # sentencepiece raises its own types for a corrupt model
        raise InputError(f"{source / 'tokenizer.model'}: cannot read the SentencePiece model ({e})", hint=_HINT) from None
    if phi3:
        size = int(config.get("vocab_size") or len(pieces))
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [_SPM_UNUSED_SCORE] * size
    types = [gguf.TokenType.UNUSED] * size
    for i, (text, score, kind) in enumerate(pieces):
        if i >= size:
            if phi3:
                raise UnsupportedConversion(f"{source / 'tokenizer.model'}: {len(pieces)} pieces but vocab_size is {size}")
            break
        tokens[i], scores[i], types[i] = text, score, kind

    def overlay(i: int, text: str, kind: gguf.TokenType) -> None:
        if i < size:
            tokens[i], scores[i], types[i] = text.encode(), _ADDED_SCORE, kind

    for text, i in spm.added_tokens_dict.items():
        overlay(int(i), text, gguf.TokenType.USER_DEFINED)
    decoder = _tokenizer_config(source).get("added_tokens_decoder") or {}
    added = [(int(i), d["content"], bool(d.get("special"))) for i, d in decoder.items()]
    if phi3 and _present(source / "tokenizer.json"):
        added += [(int(d["id"]), d["content"], bool(d.get("special"))) for d in load_json(source / "tokenizer.json").get("added_tokens", [])]
    for i, text, special in added:
        if phi3:
            overlay(i, text, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif special or looks_special(text):
            overlay(i, text, gguf.TokenType.CONTROL)
        else:
            overlay(i, text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED)
    pairs = [
        (T.MODEL, "llama", V.STRING, None),
        (T.PRE, "default", V.STRING, None),
        (T.LIST, tokens, V.ARRAY, V.STRING),
        (T.SCORES, scores, V.ARRAY, V.FLOAT32),
        (T.TOKEN_TYPE, [int(t) for t in types], V.ARRAY, V.INT32),
    ]
    if rules.spm_space_prefix is not None:
        pairs.append((T.ADD_PREFIX, rules.spm_space_prefix, V.BOOL, None))
    return Vocab("llama", pairs, special=_special_vocab(source, n_vocab=len(tokens)))


def _spm_phi3(source: Path, config: dict, size: int, strict: bool, rules: Rules) -> Vocab | None:
    if not _present(source / "tokenizer.model"):
        if _present(source / "tokenizer.json"):
            raise UnsupportedConversion(
                f"{source}: llama.cpp converts a Phi-3 tokenizer only from tokenizer.model (or tokenizer_class GPT2Tokenizer)", hint=_HINT
            )
        return None
    return _spm(source, config, size, strict, rules, phi3=True)


# ------------------------------------------------------------------------------- tokenizer.json


def _model_type(source: Path) -> tuple[str | None, dict]:
    path = source / "tokenizer.json"
    if not _present(path):
        return None, {}
    raw = load_json(path)
    return (raw.get("model") or {}).get("type"), raw


def _refuse_other_models(source: Path, kind: str | None) -> None:
    path = source / "tokenizer.json"
    if kind == "WordPiece":
        raise UnsupportedConversion(
            f"{path}: a WordPiece tokenizer; llama.cpp converts WordPiece only for BERT-family encoders (tokenizer model 'bert')",
            hint=_HINT,
        )
    if kind == "Unigram":
        raise UnsupportedConversion(
            f"{path}: a Unigram tokenizer.json; llama.cpp converts Unigram vocabularies only from a SentencePiece tokenizer.model",
            hint="Add the model's tokenizer.model. " + _HINT,
        )


def _llama_hf(source: Path, config: dict, size: int, strict: bool, rules: Rules) -> Vocab | None:
    kind, raw = _model_type(source)
    if kind != "BPE" or not raw["model"].get("byte_fallback", False):
        return None
    try:
        hf = gguf.LlamaHfVocab(source)
    except (FileNotFoundError, TypeError):
        return None  # not SentencePiece-converted: llama.cpp goes on to the byte-level path
    except Exception as e:
        raise InputError(f"{source / 'tokenizer.json'}: cannot read the tokenizer ({e})", hint=_HINT) from None
    tokens, scores, types = [], [], []
    for text, score, t in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(t))
    pairs = [
        (T.MODEL, "llama", V.STRING, None),
        (T.PRE, "default", V.STRING, None),
        (T.LIST, tokens, V.ARRAY, V.STRING),
        (T.SCORES, scores, V.ARRAY, V.FLOAT32),
        (T.TOKEN_TYPE, types, V.ARRAY, V.INT32),
    ]
    return Vocab("llama", pairs, special=_special_vocab(source, n_vocab=len(tokens)))


def _auto_tokenizer(source: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UnsupportedConversion(
            f"{source / 'tokenizer.json'}: converting a BPE tokenizer needs the transformers package", hint="pip install transformers, or " + _HINT
        ) from None
    _check_side_files(source)
    try:  # never remote code: a tokenizer class that needs it is refused here
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # transformers raises many types for unreadable or remote-code tokenizers
        raise InputError(f"{source}: cannot load the tokenizer with transformers ({str(e).splitlines()[0][:200]})", hint=_HINT) from None


def _gpt2(source: Path, config: dict, size: int, strict: bool, rules: Rules) -> Vocab | None:
    kind, _ = _model_type(source)
    if kind is None and not _present(source / "vocab.json"):
        return None
    _refuse_other_models(source, kind)
    tok = _auto_tokenizer(source)
    vocab = tok.get_vocab()
    path = source / "tokenizer.json"
    if max(vocab.values()) >= size:
        raise UnsupportedConversion(f"{path}: token ids reach {max(vocab.values())} but the vocabulary size is {size}")
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if text in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    fingerprint = hashlib.sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()
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
    special = _special_vocab(source, load_merges=True)
    if not special.merges:
        raise UnsupportedConversion(f"{path}: a BPE tokenizer without merges", hint=_HINT)
    for typ, text in rules.specials:
        if text in added:
            special._set_special_token(typ, added[text])
    pairs = [
        (T.MODEL, "gpt2", V.STRING, None),
        (T.PRE, pre, V.STRING, None),
        (T.LIST, tokens, V.ARRAY, V.STRING),
        (T.TOKEN_TYPE, [int(t) for t in types], V.ARRAY, V.INT32),
    ]
    return Vocab("gpt2", pairs, special=special, notes=notes)


# ------------------------------------------------------------------------------------- tiktoken


def _tiktoken(source: Path, config: dict, size: int, strict: bool, rules: Rules) -> Vocab | None:
    """Kimi-K2's tiktoken vocabulary as DeepseekV2Model.set_vocab converts it: byte-level token texts in
    rank order, merges rebuilt by replaying BPE on each token, the KIMI_RESERVED ids after the ranks
    special (named by added_tokens_decoder, else <|reserved_token_i|>), pre-tokenizer kimi-k2."""
    path = source / "tiktoken.model"
    if not _present(path):
        return None
    ranks = _read_ranks(path)
    to_text = gguf.vocab.bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_text[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) == 2:
                merges.append(f"{text(parts[0])} {text(parts[1])}")
    base = len(ranks)
    names = {int(i): d["content"] for i, d in (_tokenizer_config(source).get("added_tokens_decoder") or {}).items()}
    specials = {i: names.get(i, f"<|reserved_token_{i}|>") for i in range(base, base + KIMI_RESERVED)}
    reverse = {rank: text(token) for token, rank in ranks.items()} | specials
    if max(reverse) >= size:
        raise UnsupportedConversion(f"{path}: token ids reach {max(reverse)} but the vocabulary size is {size}")
    tokens = [reverse.get(i, f"[PAD{i}]") for i in range(size)]
    types = [
        int(gguf.TokenType.UNUSED if i not in reverse else gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL)
        for i in range(size)
    ]
    pairs = [
        (T.MODEL, "gpt2", V.STRING, None),
        (T.PRE, "kimi-k2", V.STRING, None),
        (T.LIST, tokens, V.ARRAY, V.STRING),
        (T.TOKEN_TYPE, types, V.ARRAY, V.INT32),
        (T.MERGES, merges, V.ARRAY, V.STRING),
    ]
    notes = ["tiktoken vocabulary written with llama.cpp's kimi-k2 pre-tokenizer (the only one it has for tiktoken models)"]
    return Vocab("gpt2", pairs, special=_special_vocab(source, load_merges=False), notes=notes)


def _read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken.model: one `base64(token bytes) rank` per line, in file order."""
    ranks = {}
    try:
        with open_regular_file(path, "r", encoding="utf-8") as f:
            lines = f.read().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    except (ValueError, binascii.Error):
        raise InputError(f"{path}: line {n} is not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Replay byte-pair merging on `token` with every merge ranked below `max_rank` (lowest rank
    first); the two parts left are the merge that produced the token."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None or best[0] >= max_rank:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


_KINDS = {"spm": _spm, "spm_phi3": _spm_phi3, "llama_hf": _llama_hf, "gpt2": _gpt2, "tiktoken": _tiktoken}


# --------------------------------------------------------------------------------- --vocab-from


def read_vocab_from(path: Path) -> Copied:
    """The tokenizer keys of a --vocab-from GGUF, refusing an unreadable one before any output exists."""
    path = Path(path)
    require_regular(path)
    header.check(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError, struct.error) as e:
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
    return Vocab("copied", pairs, notes=[f"vocabulary, special tokens and chat template copied from {path.name}"])


def add(w: gguf.GGUFWriter, vocab: Vocab) -> None:
    for key, value, vtype, sub in vocab.pairs:
        w.add_key_value(key, value, vtype, sub_type=sub)
    if vocab.special is not None:
        vocab.special.add_to_gguf(w, quiet=True)
