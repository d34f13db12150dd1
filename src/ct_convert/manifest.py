"""`ct-convert.json`, the manifest of an OUTPUT folder (tool, source, options, the sha256 and size of
every file, per-module verification), and `verify --manifest`, which re-checks a folder against it.

The manifest covers itself: `manifest_sha256` is the sha256 of its canonical body, the bytes of
`json.dumps(body, sort_keys=True, separators=(",", ":"))` (Python's json: ASCII with \\u escapes,
shortest float repr) where `body` is the manifest without that key. So an edit anywhere in it (the
recorded source, an option, a module's verification record) is reported, not only edits of files.
It is a checksum against accidents and careless edits, not a signature: whoever can rewrite the
file can recompute it.

The check reads OUTPUT without ever following a symlink: listed paths must be plain relative paths
inside OUTPUT, and every file, link or special file there that the manifest does not list is reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path, PurePosixPath

from ct_convert.errors import InputError
from ct_convert.regular_files import open_regular

NAME = "ct-convert.json"
DIGEST_KEY = "manifest_sha256"


def digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def encode(manifest: dict) -> bytes:
    """The bytes written to OUTPUT/ct-convert.json: indented for people, stamped with its digest."""
    return (json.dumps({**manifest, DIGEST_KEY: digest(manifest)}, indent=2) + "\n").encode()


def check(folder: Path) -> list[dict]:
    """Every difference between `folder` and its manifest, as {"file", "problem"}; InputError when
    the manifest itself cannot be read or has the wrong shape."""
    path = folder / NAME
    manifest = _load(path)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise InputError(f"{path}: 'files' is {type(files).__name__}, not an object of path -> {{sha256, size}}")
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("size"), int) and not isinstance(entry.get("size"), bool)):
            raise InputError(f"{path}: files[{rel!r}] is not an object with a string sha256 and an integer size")
    problems = []
    recorded = manifest.get(DIGEST_KEY)
    if recorded is None:
        problems.append({"file": NAME, "problem": f"has no {DIGEST_KEY}: its own contents cannot be checked"})
    elif recorded != digest(manifest):
        problems.append({"file": NAME, "problem": f"{DIGEST_KEY} differs: the manifest was changed after it was written"})
    found = _entries(folder, problems)
    for rel, expect in sorted(files.items()):
        if not _plain_relative(rel):
            problems.append({"file": rel, "problem": "not a relative path inside OUTPUT (absolute, '..' or unnormalized); not read"})
            continue
        kind = found.get(rel)
        if kind == "file":
            problem = _compare(folder / rel, expect)
        elif kind is not None:
            problem = f"is {kind}, not a regular file; not read"
        else:
            link = next((str(p) for p in PurePosixPath(rel).parents if found.get(str(p)) == "a symbolic link"), None)
            problem = f"lies behind the symbolic link {link}; not followed" if link else "missing"
        if problem:
            problems.append({"file": rel, "problem": problem})
    for rel, kind in sorted(found.items()):
        if rel == NAME or rel in files:
            continue
        if kind == "a symbolic link":
            problems.append({"file": rel, "problem": f"a symbolic link to {os.readlink(folder / rel)!r}, not in the manifest"})
        else:
            problems.append({"file": rel, "problem": "not in the manifest" if kind == "file" else f"{kind}, not in the manifest"})
    return problems


def _load(path: Path) -> dict:
    try:
        fd = open_regular(path, follow_symlinks=False)
        with os.fdopen(fd, "r", encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        if os.path.islink(path):
            raise InputError(f"{path}: is a symbolic link; a manifest is read only as a regular file inside OUTPUT") from None
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _plain_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and "\x00" not in rel and not p.is_absolute() and p.as_posix() == rel and not {"..", "."} & set(p.parts)


def _entries(folder: Path, problems: list[dict]) -> dict[str, str]:
    """Everything under `folder` but folders, by relative path: "file" for a regular file, else what
    it is; symlinks are listed, never followed (a linked folder is not entered)."""
    found: dict[str, str] = {}

    def unreadable(e: OSError) -> None:
        problems.append({"file": os.path.relpath(e.filename, folder), "problem": f"cannot be listed: {e.strerror}"})

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISDIR(mode):
                continue
            found[os.path.relpath(p, folder)] = "file" if stat.S_ISREG(mode) else _kind(mode)
    return found


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _compare(path: Path, expect: dict) -> str | None:
    try:
        fd = open_regular(path, follow_symlinks=False)
    except (OSError, InputError) as e:
        return f"cannot be read: {getattr(e, 'strerror', None) or e}"
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    if size != expect["size"]:
        return f"size {size} != {expect['size']}"
    if h.hexdigest() != expect["sha256"]:
        return "sha256 differs"
    return None
