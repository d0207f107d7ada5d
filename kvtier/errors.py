"""The exceptions kvtier raises on purpose; anything else escaping the package is a bug."""

from __future__ import annotations


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
