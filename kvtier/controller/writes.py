"""Copies down a tier that are still in flight, and what settles them.

Write-through tickets (a sealed block's GPU copy on its way to host), saves to serialized stores
(a block on its way to disk), and this step's token writes. It only tracks and settles tickets;
what a settled copy means for placement is the caller's business (it gets the settled list).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.blocks import BlockMeta, Tier
from kvtier.errors import KVTierError
from kvtier.tiers.base import Handle
from kvtier.transfer import Mover, Ticket


@dataclass(slots=True)
class PendingSave:
    """A block copied from `source` into `handle` of `destination`, not yet durable.

    `copy` False: a move (the source copy is freed when it lands); True: a persist copy (the
    source stays; the destination becomes one more copy, or none for a store without room of
    its own); `publish`: share it in the store once it lands (admit_after_hits)."""

    block: BlockMeta
    source: Tier
    destination: Tier
    handle: Handle
    ticket: Ticket
    copy: bool = False
    publish: bool = False


@dataclass(slots=True)
class Settled:
    """Saves that finished: the good ones, and the first error among the failed ones."""

    saved: list[PendingSave]
    failed: list[PendingSave]
    error: KVTierError | None
    # persist copies that settled, each with its error (None when it landed)
    copies: list[tuple[PendingSave, KVTierError | None]] = field(default_factory=list)


class WritesInFlight:
    """Tickets of copies whose source or destination must stay put until they land."""

    def __init__(self, mover: Mover) -> None:
        self.mover = mover
        self._through: dict[int, Ticket] = {}  # block index -> write-through in flight
        self._saves: list[PendingSave] = []
        self._step: list[Ticket] = []  # this step's new tokens going straight to host

    # -- write-through -------------------------------------------------------------------------
    def add_through(self, block: BlockMeta, ticket: Ticket) -> None:
        previous = self._through.pop(block.index, None)
        if previous is not None:
            self.mover.finish(previous)
        self._through[block.index] = ticket

    def through_pending(self, block: BlockMeta) -> bool:
        """Whether `block`'s write-through to host is still on its way."""
        ticket = self._through.get(block.index)
        return ticket is not None and not ticket.done()

    def reap_through(self) -> None:
        for index in [i for i, ticket in self._through.items() if ticket.done()]:
            del self._through[index]

    def finish_block(self, block: BlockMeta) -> None:
        """Wait for a write-through of `block`, and for persist copies reading it (before
        freeing any of its copies); a failed persist copy is settled later, never raised here."""
        ticket = self._through.pop(block.index, None)
        if ticket is not None:
            self.mover.finish(ticket)
        for save in self._saves:
            if save.copy and save.block is block:
                try:
                    self.mover.finish(save.ticket)
                except KVTierError:
                    pass  # `settle` reports it

    # -- saves ---------------------------------------------------------------------------------
    def add_save(self, save: PendingSave) -> None:
        self._saves.append(save)

    @property
    def saves_pending(self) -> bool:
        return bool(self._saves)

    def saves_from(self, tier: Tier) -> bool:
        """Whether a move out of `tier` is in flight (its room is on its way)."""
        return any(save.source is tier and not save.copy for save in self._saves)

    def saving(self, block: BlockMeta, destination: Tier) -> bool:
        """Whether any save of `block` to `destination` (a move or a copy) is still pending."""
        return any(s.block is block and s.destination is destination for s in self._saves)

    def copies_pending(self, block: BlockMeta, destination: Tier) -> bool:
        return any(
            s.copy and s.block is block and s.destination is destination for s in self._saves
        )

    def settle(self, *, wait_oldest: bool = False) -> Settled:
        """Collect the saves that are done (and the oldest one, waiting for it if asked)."""
        keep, saved, failed, copies, error = [], [], [], [], None
        for index, save in enumerate(self._saves):
            if not ((wait_oldest and index == 0) or save.ticket.done()):
                keep.append(save)
                continue
            try:
                self.mover.finish(save.ticket)
            except KVTierError as exc:
                if save.copy:
                    copies.append((save, exc))  # a persist copy: a warning, not an error
                else:
                    error = error or exc
                    failed.append(save)
                continue
            if save.copy:
                copies.append((save, None))
                continue
            saved.append(save)
        self._saves = keep
        return Settled(saved, failed, error, copies)

    # -- this step's token writes --------------------------------------------------------------
    def add_step(self, ticket: Ticket) -> None:
        self._step.append(ticket)

    def finish_step(self) -> None:
        for ticket in self._step:
            self.mover.finish(ticket)
        self._step.clear()

    # -- everything ----------------------------------------------------------------------------
    def busy(self, block: BlockMeta) -> bool:
        """Whether a copy of `block` is in flight (it is not to be chosen as a victim now)."""
        return block.index in self._through or any(s.block is block for s in self._saves)

    def finish_through_all(self) -> None:
        for ticket in self._through.values():
            self.mover.finish(ticket)
        self._through.clear()
