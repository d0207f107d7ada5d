"""Budgets: each tier's byte budget, the staging ring inside the GPU's, and changes at run time.

The GPU budget holds the staging ring (while layers stream) and the slots; a budget change
moves down what no longer fits, through Placement. Arithmetic comes from layout.py.
"""

from __future__ import annotations

from kvtier.blocks import Tier
from kvtier.controller.placement import Placement
from kvtier.errors import BudgetError, KVTierError
from kvtier.layout import min_gpu_bytes, resident_gpu_bytes, step_blocks
from kvtier.tiers.gpu import StagingRing


class Budgets:
    """The budget side of one controller's placement (which owns the budgets mapping)."""

    def __init__(self, placement: Placement, staging: StagingRing) -> None:
        self.placement = placement
        self.staging = staging

    def check_minimum(self, gpu_budget: int | None = None) -> None:
        """BudgetError unless the fastest tier's budget can make progress (and the next can hold
        a block)."""
        budget = self.placement.budgets[self.placement.top] if gpu_budget is None else gpu_budget
        need = min_gpu_bytes(self.placement.geometry, buffers=self.staging.buffers)
        if budget < need:
            raise BudgetError(
                f"gpu budget {budget} bytes is too small: streaming needs staging for one "
                f"block of every staging buffer plus one block slot, at least {need} bytes; "
                "raise gpu.budget or lower block_tokens / policy.prefetch_depth"
            )
        lower = self.placement.below(self.placement.top)
        if lower is not None and self.placement.stores[lower].capacity_blocks() < 1:
            block_bytes = self.placement.geometry.block_bytes
            raise BudgetError(
                f"{lower.name.lower()} budget {self.placement.budgets[lower]} bytes cannot hold one block: "
                f"need at least {block_bytes} bytes (1 blocks of {block_bytes} bytes)"
            )
        # a step's blocks are unsealed until it ends, so they cannot go to disk: the tiers that
        # hold open blocks need room for one prefill chunk's blocks between them
        chunk = step_blocks(
            self.placement.cfg.prefill_chunk_tokens, self.placement.geometry.block_tokens
        )
        room = self.placement.stores[self.placement.top].capacity_blocks(budget)
        if lower is not None:
            room += self.placement.stores[lower].capacity_blocks()
        if room < chunk and lower is not None:
            need = (
                chunk - room + self.placement.stores[lower].capacity_blocks()
            ) * self.placement.geometry.block_bytes
            raise BudgetError(
                f"{lower.name.lower()} budget {self.placement.budgets[lower]} bytes is too small: a "
                f"prefill chunk of {self.placement.cfg.prefill_chunk_tokens} tokens fills {chunk} blocks "
                f"that stay on gpu or {lower.name.lower()} until it ends; raise "
                f"{lower.name.lower()}.budget to at least {need} bytes or lower "
                "prefill_chunk_tokens"
            )

    def fit_staging(self, tokens: int) -> bool:
        """Grow staging to `tokens` positions, shrinking the fastest tier's room to keep within
        budget; True if the staging buffers were reallocated.

        Grows with 1/8 headroom when that costs no resident block, so decode does not
        reallocate staging (and drop its prefetches) at every block boundary.
        """
        if tokens <= self.staging.capacity_tokens:
            return False
        budget = self.placement.budgets[self.placement.top]
        store = self.placement.stores[self.placement.top]
        roomy = tokens + tokens // 8
        if (
            budget - self.staging.bytes_for(roomy)
            >= store.used_slots * self.placement.geometry.block_bytes
        ):
            tokens = roomy
        staging = self.staging.bytes_for(tokens)
        room = budget - staging
        # one block of room is enough: new blocks that find none go straight to the next tier
        if room < self.placement.geometry.block_bytes:
            need = staging + self.placement.geometry.block_bytes
            raise BudgetError(
                f"gpu budget {budget} bytes cannot hold {tokens} tokens: staging "
                f"alone takes {staging} bytes; need at least {need} bytes (raise gpu.budget, "
                "lower policy.prefetch_depth, or use a smaller context)"
            )
        self._shrink(self.placement.top, room)
        return self.staging.ensure(tokens)

    def end_staging(self) -> None:
        """Free the staging ring and give its room back to the fastest tier (nothing streams)."""
        self.staging.close()
        self.placement.stores[self.placement.top].set_limit(
            self.placement.budgets[self.placement.top]
        )

    def _shrink(self, tier: Tier, limit_bytes: int) -> None:
        """Set a store's limit, moving out the blocks whose room goes away."""
        store = self.placement.stores[tier]
        for handle in store.set_limit(limit_bytes):
            block = next(b for b in self.placement.table if b.slots.get(tier) == handle)
            self.placement.evict(block, tier)
        self.placement.finish_writes()
        store.release()

    def set_budget(self, tier: Tier, budget_bytes: int) -> None:
        """Change a tier's budget, moving down whatever no longer fits.

        A budget that cannot work raises BudgetError and leaves the old budget in force (blocks
        moved so far stay moved, consistently).
        """
        if tier not in self.placement.stores:
            raise BudgetError(
                f"no {tier.name.lower()} tier: set {tier.name.lower()}.budget > 0 when "
                "creating the cache"
            )
        self.placement.finish_writes()
        store = self.placement.stores[tier]
        old_budget, old_limit = self.placement.budgets[tier], store.limit_bytes
        limit = self._limit_for(tier, budget_bytes)
        self.placement.budgets[tier] = budget_bytes
        try:
            self._shrink(tier, limit)
        except KVTierError:
            self.placement.budgets[tier] = old_budget
            self.placement.finish_writes()
            store.set_limit(old_limit)
            raise

    def _limit_for(self, tier: Tier, budget_bytes: int) -> int:
        """The store limit a budget gives, or BudgetError if the budget cannot work."""
        store = self.placement.stores[tier]
        if tier is self.placement.top:
            self.check_minimum(budget_bytes)
            tokens = self.placement.table.seq_tokens
            in_place = resident_gpu_bytes(self.placement.geometry, tokens) <= budget_bytes
            if in_place and not self.staging.capacity_tokens:
                return budget_bytes  # the sequence still fits whole: nothing streams
            short = budget_bytes - self.staging.bytes_used < self.placement.geometry.block_bytes
            if short and self.staging.capacity_tokens:
                self.staging.resize(tokens)  # give back the growth headroom
            staging = max(self.staging.bytes_used, self.staging.bytes_for(tokens))
            if budget_bytes - staging < self.placement.geometry.block_bytes:
                raise BudgetError(
                    f"gpu budget {budget_bytes} bytes cannot hold the {tokens} tokens held now: "
                    f"streaming them takes {staging} bytes of staging; need at least "
                    f"{staging + self.placement.geometry.block_bytes}"
                )
            return budget_bytes - staging
        if self.placement.below(tier) is None:
            if budget_bytes < store.bytes_used:
                raise BudgetError(
                    f"{tier.name.lower()} budget {budget_bytes} bytes is below the "
                    f"{store.bytes_used} bytes of blocks stored only there; raise it or lower "
                    "the context"
                )
            return budget_bytes
        if budget_bytes < self.placement.geometry.block_bytes:
            raise BudgetError(
                f"{tier.name.lower()} budget {budget_bytes} bytes is below one block "
                f"({self.placement.geometry.block_bytes} bytes); the {tier.name.lower()} tier needs at "
                "least that"
            )
        return budget_bytes
