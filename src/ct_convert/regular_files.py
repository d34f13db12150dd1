"""Regular files only: every file ct-convert reads or copies from a checkpoint is opened here.

A FIFO nobody writes to would block `open()` forever, and a character device such as /dev/zero
never reaches end-of-file; both are refused, naming the path, before a byte is read. The type is
checked with stat before opening (so a device is never opened at all) and again with fstat on the
descriptor, opened non-blocking, so a file swapped for a FIFO in between cannot hang the open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ct_convert.errors import InputError, note_reading

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse(path: Path, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise InputError(f"{path}: is {kind}, not a regular file; ct-convert reads and copies regular files only")


def require_regular(path: Path) -> os.stat_result:
    """stat `path` (following symlinks) and refuse anything but a regular file; a broken symlink is
    reported as such. OSError (missing, permission) is left to the caller."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{path}: a symbolic link to {os.readlink(path)!r}, which does not exist") from None
        raise
    _refuse(path, st.st_mode)
    return st


def open_regular(path: Path, *, follow_symlinks: bool = True) -> int:
    """A blocking read-only descriptor of the regular file `path`; InputError for anything else.
    With follow_symlinks=False a symlink itself is refused (ELOOP)."""
    path = Path(path)
    note_reading(path)
    if follow_symlinks:
        require_regular(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        _refuse(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path: Path, mode: str = "rb", **kwargs):
    """`open_regular` as a Python file object (`mode` "rb" or "r" with `encoding`)."""
    return os.fdopen(open_regular(path), mode, **kwargs)
