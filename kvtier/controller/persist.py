"""Persist write-through: sealed blocks copied to the shared disk area and the remote server.

With `disk.persist` every sealed block with known tokens is saved to disk and with
`remote.persist` sent to the server, both from a host copy in the mover's I/O threads, off the
decode path; with `disk.admit_after_hits` above 0, only once this process reused it that many
times (to disk: saved privately, then published; to the server: not sent before). A failed
persist copy is a warning, never an error: the block keeps its copies. It decides nothing about
placement; Placement settles the saves it submits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kvtier.blocks import BlockMeta, BlockTable, Tier
from kvtier.config import Config
from kvtier.controller.index import INDEX
from kvtier.controller.stats import Counters
from kvtier.controller.writes import PendingSave, WritesInFlight
from kvtier.errors import NotStored
from kvtier.layout import KVGeometry
from kvtier.tiers.base import Handle, TierStore
from kvtier.transfer import Copy, Mover

log = logging.getLogger(__name__)


class Persister:
    """The queue of sealed blocks still to be written through to the persistent stores."""

    def __init__(
        self,
        cfg: Config,
        geometry: KVGeometry,
        stores: dict[Tier, TierStore],
        *,
        table: BlockTable,
        writes: WritesInFlight,
        mover: Mover,
        counters: Counters,
        hits: Callable[[str], int] = INDEX.hits,
    ) -> None:
        self.stores = stores
        self.counters = counters
        self.block_bytes = geometry.block_bytes
        self.table = table
        self.writes = writes
        self.mover = mover
        self.hits = hits
        self.admit_after_hits = cfg.disk.admit_after_hits
        self.targets = [
            tier
            for tier, wanted in ((Tier.DISK, cfg.disk.persist), (Tier.REMOTE, cfg.remote.persist))
            if wanted and tier in stores
        ]
        # saves read host memory: on a GPU, a block needs its host copy (write-through) first
        self.needs_host = bool(self.targets) and any(d.type != "cpu" for d in geometry.devices)
        self._queue: list[tuple[BlockMeta, Tier]] = []
        self.counts = {"saved": 0, "skipped": 0, "failed": 0}
        self._warned: set[str] = set()

    def add(self, blocks: list[BlockMeta], *, skip: frozenset[Tier] = frozenset()) -> int:
        """Queue freshly sealed (or reused) blocks for every target not in `skip`; the saves
        queued."""
        queued = len(self._queue)
        if not self.targets:
            return 0
        for block in blocks:
            if not block.token_ids:
                continue  # an anonymous id is never looked up again
            for tier in self.targets:
                if tier in skip or not self._admitted(block):
                    continue
                self._queue.append((block, tier))
        return len(self._queue) - queued

    def _admitted(self, block: BlockMeta) -> bool:
        return self.admit_after_hits == 0 or self.hits(block.block_id) >= self.admit_after_hits

    def pump(self) -> None:
        """Submit the queued saves whose block has a copy to read (else wait for it): all of
        them in one mover call, so a prefill's sealed blocks reach the server in pipelined
        save_blocks calls, not one round trip each."""
        if not self._queue:
            return
        waiting = []
        saves: list[tuple[BlockMeta, Tier, Tier, Handle, Copy]] = []
        chosen: set[tuple[int, Tier]] = set()  # a block queued twice (sealed, reused): one save
        for block, tier in self._queue:
            if not self._held(block) or (id(block), tier) in chosen:
                continue  # cropped or reset away, or saved already
            source = self._source(block, tier)
            if source is None:
                waiting.append((block, tier))
                continue
            chosen.add((id(block), tier))
            prepared = self._prepare(block, tier, source)
            if prepared is not None:
                saves.append((block, tier, source, *prepared))
        self._queue = waiting
        tickets = self.mover.submit_saves([copy for *_, copy in saves])
        for (block, tier, source, handle, _), ticket in zip(saves, tickets, strict=True):
            publish = tier is Tier.DISK and self.admit_after_hits > 0
            self.writes.add_save(
                PendingSave(block, source, tier, handle, ticket, copy=True, publish=publish)
            )

    def _held(self, block: BlockMeta) -> bool:
        index = block.index
        return index < len(self.table) and self.table[index] is block and block.sealed

    def _source(self, block: BlockMeta, target: Tier) -> Tier | None:
        """A copy the I/O threads can read now: host memory, written through already; else,
        for the server, the block's disk file once it is written (a host tier too small to
        keep a block until its save ran sends it on to disk first)."""
        if target in block.slots:
            return target  # on disk already: _submit shares it
        for tier in sorted(block.slots):
            store = self.stores[tier]
            on_cpu = tier is Tier.HOST or (tier is Tier.GPU and not self.needs_host)
            if store.holds_open_blocks and on_cpu and not self.writes.through_pending(block):
                return tier
        if target is Tier.REMOTE and Tier.DISK in block.slots:
            if not self.writes.saving(block, Tier.DISK):
                return Tier.DISK  # relayed through host memory by the mover
        return None

    def _prepare(self, block: BlockMeta, tier: Tier, source: Tier) -> tuple[Handle, Copy] | None:
        """The handle and copy that save `block` to `tier` from `source`; None when there is
        nothing to copy (on disk already: shared; a save of it in flight; no room)."""
        store = self.stores[tier]
        if source is tier:  # on disk already (evicted there, privately): share it
            if tier is Tier.DISK and self.admit_after_hits > 0:
                store.publish(block.block_id)
            return None
        if self.writes.copies_pending(block, tier):
            return None
        handle = block.block_id if tier is Tier.REMOTE else store.allocate(block)
        if handle is None:
            self.counts["skipped"] += 1  # no room: the block reaches disk only if evicted
            return None
        parent = self.table.parent_id(block)
        source_copy = self.stores[source].block_source(block.slots[source])
        return handle, (source_copy, store.block_target(handle, parent_id=parent))

    def landed(self, save: PendingSave, error: Exception | None) -> None:
        """Record a settled persist copy: one more copy of the block (disk), or none (remote)."""
        store = self.stores[save.destination]
        if error is not None:
            self.counts["failed"] += 1
            store.free(save.handle)
            cause = type(error).__name__
            # NotStored: the store warned once per cause already (a server down, slow, full)
            first = cause not in self._warned and not isinstance(error, NotStored)
            self._warned.add(cause)
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "persist copy to %s failed: %s",
                save.destination.name,
                error,
            )
            return
        self.counts["saved"] += 1
        self.counters.tiers[save.destination].bytes_written += self.block_bytes
        self.counters.tiers[save.source].bytes_read += self.block_bytes
        if save.destination not in self.stores or store.limit_bytes == 0:
            return  # the remote tier: shared, never one of the block's copies
        if not self._held(save.block) or save.destination in save.block.slots:
            if save.block.slots.get(save.destination) != save.handle:
                store.free(save.handle)  # dropped meanwhile, or a copy landed another way
            return
        save.block.slots[save.destination] = save.handle
        if save.publish:
            store.publish(save.block.block_id)


def persisted_by(controller: Any, owner: Any) -> set[Tier]:
    """The persistent tiers another live cache `owner` writes every sealed block of its own to
    that this controller's are too (the same disk store, the same server): it saved or queued
    the block when it sealed it, so a copy from it needs no save (nor a host copy for one)."""
    if owner is None or owner.placement.persist.admit_after_hits:
        return set()
    mine, theirs = controller.stores, owner.stores
    skip = set()
    targets = owner.placement.persist.targets
    if Tier.DISK in targets and Tier.DISK in mine:
        if theirs[Tier.DISK].store.root.resolve() == mine[Tier.DISK].store.root.resolve():
            skip.add(Tier.DISK)
    if Tier.REMOTE in targets and Tier.REMOTE in mine:
        if theirs[Tier.REMOTE].spec == mine[Tier.REMOTE].spec:
            skip.add(Tier.REMOTE)
    return skip
