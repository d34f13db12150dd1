"""Exceptions that the CLI turns into one-line messages and exit codes (cli.md)."""


class CTConvertError(Exception):
    """Bad input or a conversion that cannot be represented: exit code 2.

    `hint` is the next thing the user can do; it is printed on a second line.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class InputError(CTConvertError):
    """The checkpoint (a file, a tensor, the config) is unreadable or inconsistent."""


class UnsupportedConversion(CTConvertError):
    """The target cannot hold a module exactly; refused rather than approximated."""


class OutputError(CTConvertError):
    """OUTPUT cannot be written (exists, permission denied, disk full)."""


class VerificationFailed(CTConvertError):
    """Dequantized output differs from the source, or files differ from the manifest: exit code 1."""

    exit_code = 1


# The file most recently opened for reading, for the message of an unexpected error: a bug or an
# input no check anticipated is far easier to report when it names the file that triggered it.
_being_read: list = [None]


def note_reading(path) -> None:
    _being_read[0] = path


def file_being_read():
    return _being_read[0]
