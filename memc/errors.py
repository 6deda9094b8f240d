"""User-facing errors: the CLI prints these as one clear message and exits non-zero, never a traceback."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``: enough to act on, without a library's multi-page dump."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


class MemcError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do.

    ``exit_code`` lets the CLI distinguish bad input (2) from a failed verification (3).
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n  hint: {self.hint}" if self.hint else base


class ConfigError(MemcError):
    """toolchain.toml (or a pass option) is malformed: the message names the exact key path."""


class CaptureError(MemcError):
    """The model could not be loaded or captured with torch.export."""


class PassError(MemcError):
    """A pass failed or its requirements were not met; the message says which passes ran."""


class UnsupportedError(MemcError):
    """The target cannot express part of the program; the message names the node and why."""


class ArtifactError(MemcError):
    """A compiled artifact is missing or unreadable, or was given inputs its graphs do not take."""


class VerificationError(MemcError):
    """The compiled artifact does not match the original program within tolerance."""

    exit_code = 3
