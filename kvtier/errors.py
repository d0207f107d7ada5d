"""The exceptions kvtier raises on purpose; anything else escaping the package is a bug.

`shown(value)` is how a message quotes the value at fault: its repr, kept short and on one line;
`printable(text)` leaves a path or name as is when it already is.
"""

from __future__ import annotations

import reprlib


class KVTierError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line and exits 2."""


class ConfigError(KVTierError, ValueError):
    """A config key, value or combination that cannot be used."""


class BudgetError(KVTierError):
    """A tier budget too small to make progress; the message names the minimum that would work."""


class StoreCorruptError(KVTierError):
    """A disk block failed its checksum or could not be parsed."""


class UnsupportedModelError(KVTierError):
    """A model whose cache layout kvtier does not understand."""


class RemoteError(KVTierError):
    """A remote tier server that is unreachable, refused our credentials or failed an admin call."""


class NotStored(KVTierError):
    """A store did not take a block it was given (the remote tier: its server down, slow or
    full); the store warned about the cause already."""


class _ShortRepr(reprlib.Repr):
    """reprlib's depth and length limits, and no str() of huge ints (Python refuses > 4300 digits)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 60, 60, 40
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 6

    def repr_int(self, x: int, level: int) -> str:
        if abs(x) < 10**self.maxlong:
            return repr(x)
        return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"


def shown(value: object) -> str:
    """`repr(value)` for an error message: one line, at most 80 characters, never raising."""
    try:
        text = _ShortRepr().repr(value)
    except Exception:  # a user object whose repr raises must not hide the real error
        return f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:64] + "..." + text[-13:]  # nesting multiplies


def printable(text: object) -> str:
    """`str(text)` when it is short and printable on one line, else `shown` of it."""
    string = str(text)
    return string if string.isprintable() and len(string) <= 200 else shown(string)
