"""JSON that arrives with a checkpoint (config, index, tokenizer files, safetensors headers), parsed
with bounded size and depth so that any file fails with one line naming it.

Python's parser recurses once per nesting level: a file nested 10^5 levels deep raises RecursionError,
and one that parses just under the interpreter's limit can still break a later `json.dumps` of the
same value from a deeper stack. Real files nest a handful of levels, so anything deeper than
MAX_DEPTH is refused at load time.
"""

from __future__ import annotations

import gc
import json
import os
from contextlib import contextmanager
from pathlib import Path

from ct_convert.errors import InputError
from ct_convert.regular_files import open_regular_file

MAX_JSON_BYTES = 100_000_000  # the size safetensors allows a header; no config or index comes near it
MAX_DEPTH = 64


class TooManyObjects(Exception):
    """Raised from inside the parser once a file holds more objects than the caller allows."""


def parse(text: str | bytes, where: str, max_objects: int | None = None, check_depth: bool = True):
    """Parse JSON text, turning every failure into an InputError naming `where`.

    With `max_objects`, parsing stops as soon as that many JSON objects were built, so an oversized
    document costs time and memory in proportion to the limit, not to its size. `check_depth=False`
    is for callers that validate the whole structure themselves (safetensors headers)."""
    hook = None
    if max_objects is not None:
        count = 0

        def hook(pairs):
            nonlocal count
            count += 1
            if count > max_objects:
                raise TooManyObjects
            return dict(pairs)

    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        with gc_paused():
            value = json.loads(text, object_pairs_hook=hook)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    if check_depth and not _shallow(value):
        raise InputError(f"{where}: JSON nested more than {MAX_DEPTH} levels deep")
    return value


@contextmanager
def gc_paused():
    """Building 10^5-10^6 small containers (a large header, its validated entries) sets off the
    cyclic garbage collector again and again, each pass walking everything built so far: pausing it
    halves the time. Nothing built meanwhile holds a cycle."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_json(path: Path) -> dict:
    """A JSON object from a file of at most MAX_JSON_BYTES."""
    try:
        with open_regular_file(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise InputError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES}-byte limit for a JSON file")
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise InputError(f"{path}: more than the {MAX_JSON_BYTES}-byte limit for a JSON file")
    data = parse(raw, str(path))
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _shallow(value) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, (dict, list)))
    return True
