"""Placement: which tier holds each block, within every tier's budget.

Tiers are ordered fastest first (GPU, host, disk). Placement makes room by moving policy victims
down one tier, writes sealed blocks through to the next tier, promotes into free room of the
fastest tier, settles saves in flight, and changes budgets. It decides; stores store and the
mover copies. It never looks at which tier a store is, only at its place in the order.
"""

from __future__ import annotations

import logging

from kvtier.blocks import BlockMeta, BlockTable, Tier
from kvtier.config import Config
from kvtier.controller.lost import LostBlockError, lost_error
from kvtier.controller.persist import Persister
from kvtier.controller.stats import Counters
from kvtier.controller.writes import PendingSave, WritesInFlight
from kvtier.errors import BudgetError, KVTierError
from kvtier.layout import KVGeometry
from kvtier.policy import Policy
from kvtier.tiers import configured_budgets, configured_device_budgets
from kvtier.tiers.base import Handle, TierStore
from kvtier.tiers.gpu import StagingRing
from kvtier.transfer import Lane, Mover

log = logging.getLogger(__name__)

# keep this many free slots of the fastest tier for new blocks before promoting streamed blocks
# into it, so a promotion is not undone by the next block to seal
PROMOTE_RESERVE_SLOTS = 2
PROMOTE_PER_STEP = 4


class Placement:
    """Block copies across the tiers of one sequence; `version` changes with every slot change."""

    def __init__(
        self,
        cfg: Config,
        geometry: KVGeometry,
        stores: dict[Tier, TierStore],
        *,
        policy: Policy,
        table: BlockTable,
        mover: Mover,
        staging: StagingRing,
        counters: Counters,
    ) -> None:
        self.cfg = cfg
        self.geometry = geometry
        self.stores = stores
        # fastest first; a store with no room of its own (the remote tier, a shared cache that
        # may drop any value) stays in `stores` for reuse but is never where a block moves
        self.order = sorted(tier for tier, store in stores.items() if store.limit_bytes > 0)
        self.top = self.order[0]
        self.policy = policy
        self.table = table
        self.mover = mover
        self.staging = staging
        self.counters = counters
        self.writes = WritesInFlight(mover)
        self.persist = Persister(
            cfg, geometry, stores, table=table, writes=self.writes, mover=mover, counters=counters
        )
        configured = configured_budgets(cfg)
        self.budgets = {tier: configured[tier] for tier in self.order}
        # the fastest tier lives on the model's devices, with a budget per device; its entry in
        # `budgets` is their sum (what stats() reports)
        self.device_budgets = configured_device_budgets(cfg, geometry)
        self.budgets[self.top] = sum(self.device_budgets.values())
        self.version = 0
        # a failed save settled after a step committed waits here for the next step to raise it
        self.deferred: KVTierError | None = None
        # indices of blocks whose only copy was lost (a stored file missing or corrupt): they
        # stay in the table, with no copy, until a crop or reset drops them
        self.lost: set[int] = set()

    def below(self, tier: Tier) -> Tier | None:
        """The next slower tier, or None for the slowest."""
        index = self.order.index(tier) + 1
        return self.order[index] if index < len(self.order) else None

    # -- room ----------------------------------------------------------------------------------
    def allocate(
        self,
        tier: Tier,
        block: BlockMeta,
        *,
        protected: frozenset[int] = frozenset(),
        seq_tokens: int = 0,
        required: bool = True,
        pins: bool = True,
    ) -> Handle | None:
        """Room for a copy of `block` in `tier`, moving victims down to make it.

        `protected` block indices are never victims; `seq_tokens` is the committed length the
        policy pins against (`pins=False` lets pinned blocks go too, in policy order). When
        nothing can move: None if not `required`, else BudgetError.
        """
        store = self.stores[tier]
        self.settle()
        handle = store.allocate(block)
        while handle is None:
            if self.writes.saves_from(tier):  # room is on its way: a save frees its source
                self.settle(wait_oldest=True)
                handle = store.allocate(block)
                continue
            victim = self._victim(tier, protected, seq_tokens, pins)
            if victim is None:
                if not required:
                    return None
                raise BudgetError(self._full_message(tier, len(protected)))
            self.evict(victim, tier)
            handle = store.allocate(block)
        self.version += 1
        return handle

    def _victim(
        self, tier: Tier, protected: frozenset[int], seq_tokens: int, pins: bool = True
    ) -> BlockMeta | None:
        if tier is self.top:
            # the policy's own order; pinned blocks stay and the open block keeps its slot
            candidates = [
                b for b in self.table.in_tier(tier) if b.sealed and b.index not in protected
            ]
            if not pins:
                return min(candidates, key=self.policy.sort_key, default=None)
            victims = self.policy.victims(candidates, 1, seq_tokens)
            return victims[0] if victims else None
        self.writes.reap_through()
        held = [b for b in self.table.in_tier(tier) if not self.writes.busy(b)]
        # a copy another tier also holds is free to drop; pins say nothing about lower tiers
        redundant = [b for b in held if len(b.slots) > 1]
        if redundant:
            return min(redundant, key=self.policy.sort_key)
        below = self.below(tier)
        if below is None:
            return None
        movable = [b for b in held if b.sealed or self.stores[below].holds_open_blocks]
        return min(movable, key=self.policy.sort_key) if movable else None

    def _full_message(self, tier: Tier, step_blocks: int) -> str:
        block_bytes = self.geometry.block_bytes
        name, budget = tier.name.lower(), self.budgets[tier]
        if tier is self.top:
            return (
                f"{name} budget {budget} bytes holds only {self.stores[tier].used_slots} blocks "
                f"here, all pinned or in use by this step; need room for {step_blocks + 1} more "
                f"blocks of {block_bytes} bytes: raise gpu.budget or lower "
                "policy.recent_tokens / sink_tokens"
            )
        below = self.below(tier)
        why = "blocks are unsealed"
        if below is None:
            # a slower kind that is not configured and could hold the blocks (not the remote)
            below = next((t for t in Tier if tier < t < Tier.REMOTE), None)
            if below is None:
                return (
                    f"the {name} store is full: its {budget}-byte budget holds "
                    f"{self.stores[tier].bytes_used} bytes of blocks kept only there; raise "
                    f"{name}.budget or use a smaller context"
                )
            why = f"no {below.name.lower()} tier"
        return (
            f"{name} budget {budget} bytes is full and no block can move to {below.name.lower()} "
            f"({why}); raise {name}.budget (each block is {block_bytes} bytes) "
            f"or {below.name.lower()}.budget"
        )

    def evict(self, block: BlockMeta, tier: Tier) -> None:
        """Drop `block`'s copy in `tier`, first making sure another tier holds it."""
        if len(block.slots) == 1:
            below = self.below(tier)
            if below is None:
                raise BudgetError(
                    f"{tier.name.lower()} tier must shrink but a block has nowhere to go: "
                    "enable the disk tier (disk.budget > 0) or keep the budget larger"
                )
            if not block.sealed and not self.stores[below].holds_open_blocks:
                raise BudgetError(
                    f"{tier.name.lower()} tier must shrink but block {block.index} is still "
                    f"filling (only full blocks can go to {below.name.lower()}); keep "
                    f"{tier.name.lower()}.budget at least {self.stores[tier].bytes_used} bytes "
                    "until it fills, or lower it later"
                )
            if not self.move(block, tier, below):
                return  # a save in flight: the copy in `tier` is freed when it settles
        else:
            self.free_copy(block, tier)
        if tier is self.top:
            self.counters.demotions += 1

    def move(self, block: BlockMeta, source: Tier, destination: Tier) -> bool:
        """Copy `block` from `source` into new room in `destination` and drop the source copy.

        Returns False when the copy completes in the background (a save): the source copy is
        freed when `settle` sees it land.
        """
        handle = self.allocate(destination, block)
        ticket = self.mover.submit([self._copy(block, source, destination, handle)], lane=Lane.NOW)
        if ticket.background:
            self.writes.add_save(PendingSave(block, source, destination, handle, ticket))
            return False
        self._landed(block, destination, handle)
        self._count(source, destination)
        self.free_copy(block, source)
        return True

    def copy_into(self, block: BlockMeta, tier: Tier, handle: Handle) -> None:
        """Copy every layer of `block` from its fastest tier into `handle` of `tier`, in compute
        order; StoreCorruptError when the only copy is lost."""
        source = block.fastest_tier()
        ticket = self.mover.submit([self._copy(block, source, tier, handle)], lane=Lane.NOW)
        if not self.mover.wait(ticket):
            self.stores[tier].free(handle)
            error = lost_error(ticket, during="a promotion")
            self.lose(error)
            raise error
        self._landed(block, tier, handle)
        self._count(source, tier)

    def _copy(self, block: BlockMeta, source: Tier, destination: Tier, handle: Handle):
        parent = self.table.parent_id(block)
        return (
            self.stores[source].block_source(block.slots[source]),
            self.stores[destination].block_target(handle, parent_id=parent),
        )

    def _landed(self, block: BlockMeta, tier: Tier, handle: Handle) -> None:
        block.slots[tier] = handle
        self.version += 1

    def _count(self, source: Tier | None, destination: Tier) -> None:
        if source is not None:
            self.counters.tiers[source].bytes_read += self.geometry.block_bytes
        self.counters.tiers[destination].bytes_written += self.geometry.block_bytes

    def free_copy(self, block: BlockMeta, tier: Tier) -> None:
        self.writes.finish_block(block)  # no copy in flight may still read or write this one
        self.stores[tier].free(block.slots.pop(tier))
        self.version += 1

    def lose(self, error: LostBlockError) -> None:
        """Drop the copies `error` names (their files are gone or quarantined); a block left
        with no copy joins `lost`."""
        for store, key in error.lost:
            for block in self.table:
                tier = next(
                    (t for t, h in block.slots.items() if self.stores[t] is store and h == key),
                    None,
                )
                if tier is None:
                    continue
                self.free_copy(block, tier)
                if not block.slots:
                    self.lost.add(block.index)

    def drop(self, block: BlockMeta) -> None:
        """Free every copy of a block leaving the sequence."""
        for tier in list(block.slots):
            self.free_copy(block, tier)

    # -- sealing and promotion -----------------------------------------------------------------
    def seal(self, blocks: list[BlockMeta]) -> None:
        """Write freshly sealed blocks through to the next tier, so a demotion is free later."""
        lower = self.below(self.top)
        if lower is None:
            return
        for block in blocks:
            if lower in block.slots or self.top not in block.slots:
                continue  # written straight to the lower tier while it filled
            try:
                handle = self.allocate(lower, block)
            except BudgetError:
                # write-through only makes a later demotion free; without room the block stays
                # on the fastest tier alone and is copied down if it is ever demoted
                log.debug("no %s room to write block %d through", lower.name, block.index)
                continue
            block.slots[lower] = handle
            copy = self._copy(block, self.top, lower, handle)
            self.writes.add_through(block, self.mover.submit([copy], lane=Lane.WRITE_BACK))
            self._count(None, lower)
        self.writes.reap_through()
        self.version += 1

    def promote(self) -> None:
        """Move streamed blocks into free room of the fastest tier, a few per step."""
        store = self.stores[self.top]
        room = store.room_blocks() - PROMOTE_RESERVE_SLOTS
        moved = 0
        for block in self.table:
            if moved >= PROMOTE_PER_STEP or room <= 0:
                break
            if self.top in block.slots:
                continue
            handle = store.allocate(block)
            if handle is None:
                break
            self.copy_into(block, self.top, handle)
            if not block.sealed:
                # the open block takes new tokens in one place only: drop its other copies
                for tier in [t for t in block.slots if t is not self.top]:
                    self.free_copy(block, tier)
            room -= 1
            moved += 1
        self.counters.promotions += moved

    # -- writes in flight ----------------------------------------------------------------------
    def settle(self, *, wait_oldest: bool = False) -> None:
        """Record finished saves (their source copies free up); a failed save is dropped and
        raised once, its block keeping its source copy, so nothing is lost."""
        settled = self.writes.settle(wait_oldest=wait_oldest)
        for save in settled.saved:
            self._landed(save.block, save.destination, save.handle)
            self._count(None, save.destination)
            self.free_copy(save.block, save.source)
        for save in settled.failed:
            self.stores[save.destination].free(save.handle)
        for save, error in settled.copies:
            self.persist.landed(save, error)
            if error is None and save.destination in save.block.slots:
                self.version += 1
        if settled.error is not None:
            raise settled.error

    def after_commit(self, sealed: list[BlockMeta], *, write_through: bool = True) -> None:
        """Seal and promote once a step's tokens are committed: what fails here (a save that
        failed meanwhile, a lost block met by a promotion) must not undo the step, so it is
        kept for `raise_deferred` at the start of the next one."""
        try:
            if sealed and (write_through or self.persist.needs_host):
                self.seal(sealed)
            if sealed:
                self.persist.add(sealed)
            self.persist.pump()
            if self.writes.saves_pending:
                self.settle()
            self.promote()
        except KVTierError as error:
            self.deferred = self.deferred or error  # a lost block is marked lost already

    def raise_deferred(self) -> None:
        error, self.deferred = self.deferred, None
        if error is not None:
            raise error

    def finish_writes(self) -> None:
        """Wait for every copy in flight (before edits that rewrite or free copies)."""
        self.writes.finish_through_all()
        while self.writes.saves_pending:
            self.settle(wait_oldest=True)

    # -- checks (tests; cheap enough for debugging runs) ---------------------------------------
    def check_invariants(self) -> None:
        for block in self.table:
            assert block.slots or block.index in self.lost, f"block {block.index} is in no tier"
            for tier, handle in block.slots.items():
                if not self.stores[tier].holds_open_blocks:
                    assert block.sealed and self.stores[tier].contains(handle), block
        top = self.stores[self.top]
        assert top.bytes_used + self.staging.bytes_used <= self.budgets[self.top]
        for device, budget in self.device_budgets.items():
            used = top.bytes_on(device) + self.staging.bytes_on(device)
            assert used <= budget, f"{device}: {used} bytes over its {budget}-byte budget"
        for tier in self.order[1:]:
            assert self.stores[tier].bytes_used <= self.budgets[tier], tier
        for tier in self.order:
            store = self.stores[tier]
            if store.holds_open_blocks:
                slots = [b.slots[tier] for b in self.table if tier in b.slots]
                assert len(slots) == len(set(slots)) == store.used_slots, f"{tier.name} slot leak"
