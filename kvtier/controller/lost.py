"""Blocks whose only copy is gone: a stored file missing or failing verification mid-run.

Turns a mover ticket's failed loads into one StoreCorruptError line that says which block and
why (missing, or failed verification), and carries the (store, key) pairs so placement can drop
the dead copies. It only describes; placement marks the blocks lost.
"""

from __future__ import annotations

from kvtier.errors import StoreCorruptError
from kvtier.tiers.base import Stored
from kvtier.tiers.disk.format import ReadResult
from kvtier.transfer import Ticket

_WHY = {
    ReadResult.MISSING: "is missing (deleted outside kvtier, or collected)",
    ReadResult.CORRUPT: "failed verification (quarantined)",
}


class LostBlockError(StoreCorruptError):
    """A stored copy a step needed could not be read; `lost` lists (store, key) of each one."""

    def __init__(self, message: str, lost: list[tuple[object, str]]) -> None:
        super().__init__(message)
        self.lost = lost


def reason(result: object) -> str:
    """Why a load failed, in words (a ReadResult, or a plain False from another store)."""
    return _WHY.get(result, "could not be read")  # type: ignore[call-overload]


def lost_error(ticket: Ticket, *, during: str) -> LostBlockError:
    """The error for a ticket whose loads failed `during` ("streaming", "a promotion", ...)."""
    failures: list[tuple[Stored, object]] = ticket.failures()
    first = failures[0] if failures else None
    if first is None:
        what = "a stored block could not be read"
    else:
        tier = getattr(first[0].store, "tier", None)
        name = tier.name.lower() if tier is not None else "stored"
        what = f"{name} block {first[0].key} {reason(first[1])}"
        if len(failures) > 1:
            what += f" (and {len(failures) - 1} more)"
    return LostBlockError(
        f"{what} during {during}; it was the only copy, so its tokens are lost: crop the cache "
        "to before them (cache.crop) or re-run the prompt",
        [(source.store, source.key) for source, _ in failures],
    )
