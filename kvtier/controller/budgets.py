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
        self.geometry = placement.geometry
        self.stores = placement.stores
        self.budgets = placement.budgets
        self.top = placement.top

    def check_minimum(self, changed: dict[Tier, int] | None = None) -> None:
        """BudgetError unless the budgets (with `changed` ones instead) can make progress: the
        GPU can stream, the next tier holds a block, and GPU and next tier together hold one
        prefill chunk's blocks."""
        budget = {**self.budgets, **(changed or {})}
        block_bytes = self.geometry.block_bytes
        need = min_gpu_bytes(self.geometry, buffers=self.staging.buffers)
        if budget[self.top] < need:
            raise BudgetError(
                f"gpu budget {budget[self.top]} bytes is too small: streaming needs staging for "
                f"one block of every staging buffer plus one block slot, at least {need} "
                "bytes; raise gpu.budget or lower block_tokens / policy.prefetch_depth"
            )
        lower = self.placement.below(self.top)
        if lower is None:
            return
        name = lower.name.lower()
        lower_blocks = self.stores[lower].capacity_blocks(budget[lower])
        if lower_blocks < 1:
            raise BudgetError(
                f"{name} budget {budget[lower]} bytes cannot hold one block: need at least "
                f"{block_bytes} bytes (1 blocks of {block_bytes} bytes)"
            )
        # a chunk's blocks are unsealed until it ends, so they cannot go to disk: the tiers that
        # hold open blocks need room for one prefill chunk's blocks between them
        chunk_tokens = self.placement.cfg.prefill_chunk_tokens
        chunk = step_blocks(chunk_tokens, self.geometry.block_tokens)
        room = self.stores[self.top].capacity_blocks(budget[self.top]) + lower_blocks
        if room < chunk:
            need = (chunk - room + lower_blocks) * block_bytes
            raise BudgetError(
                f"{name} budget {budget[lower]} bytes is too small: a prefill chunk of "
                f"{chunk_tokens} tokens fills {chunk} blocks that stay on gpu or {name} until it "
                f"ends; raise {name}.budget to at least {need} bytes or lower "
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
        budget, block_bytes = self.budgets[self.top], self.geometry.block_bytes
        roomy = tokens + tokens // 8
        keep = max(self.stores[self.top].used_slots, 1) * block_bytes  # at least one slot
        if budget - self.staging.bytes_for(roomy) >= keep:
            tokens = roomy
        staging = self.staging.bytes_for(tokens)
        # one block of room is enough: new blocks that find none go straight to the next tier
        if budget - staging < block_bytes:
            raise BudgetError(
                f"gpu budget {budget} bytes cannot hold {tokens} tokens: staging alone takes "
                f"{staging} bytes; need at least {staging + block_bytes} bytes (raise "
                "gpu.budget, lower policy.prefetch_depth, or use a smaller context)"
            )
        self._shrink(self.top, budget - staging)
        return self.staging.ensure(tokens)

    def end_staging(self) -> None:
        """Free the staging ring and give its room back to the fastest tier (nothing streams)."""
        self.staging.close()
        self.stores[self.top].set_limit(self.budgets[self.top])

    def _shrink(self, tier: Tier, limit_bytes: int) -> None:
        """Set a store's limit, moving out the blocks whose room goes away."""
        store = self.stores[tier]
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
        if tier not in self.stores:
            raise BudgetError(
                f"no {tier.name.lower()} tier: set {tier.name.lower()}.budget > 0 when "
                "creating the cache"
            )
        self.placement.finish_writes()
        store = self.stores[tier]
        old_budget, old_limit = self.budgets[tier], store.limit_bytes
        limit = self._limit_for(tier, budget_bytes)
        self.budgets[tier] = budget_bytes
        try:
            self._shrink(tier, limit)
        except KVTierError:
            self.budgets[tier] = old_budget
            self.placement.finish_writes()
            store.set_limit(old_limit)
            raise

    def _limit_for(self, tier: Tier, budget_bytes: int) -> int:
        """The store limit a budget gives, or BudgetError if the budget cannot work."""
        store, block_bytes, name = self.stores[tier], self.geometry.block_bytes, tier.name.lower()
        if tier is self.top:
            self.check_minimum({tier: budget_bytes})
            return self._gpu_limit(budget_bytes)
        if self.placement.below(tier) is None:
            if budget_bytes < store.bytes_used:
                raise BudgetError(
                    f"{name} budget {budget_bytes} bytes is below the {store.bytes_used} bytes "
                    "of blocks stored only there; raise it or lower the context"
                )
            return budget_bytes
        if budget_bytes < block_bytes:
            raise BudgetError(
                f"{name} budget {budget_bytes} bytes is below one block ({block_bytes} bytes); "
                f"the {name} tier needs at least that"
            )
        self.check_minimum({tier: budget_bytes})
        return budget_bytes

    def _gpu_limit(self, budget_bytes: int) -> int:
        """The GPU pool's limit under a new GPU budget: all of it while the sequence still fits
        whole, else what the staging for the tokens held leaves."""
        tokens = self.placement.table.seq_tokens
        in_place = resident_gpu_bytes(self.geometry, tokens) <= budget_bytes
        if in_place and not self.staging.capacity_tokens:
            return budget_bytes
        short = budget_bytes - self.staging.bytes_used < self.geometry.block_bytes
        if short and self.staging.capacity_tokens:
            self.staging.resize(tokens)  # give back the growth headroom
        staging = max(self.staging.bytes_used, self.staging.bytes_for(tokens))
        if budget_bytes - staging < self.geometry.block_bytes:
            raise BudgetError(
                f"gpu budget {budget_bytes} bytes cannot hold the {tokens} tokens held now: "
                f"streaming them takes {staging} bytes of staging; need at least "
                f"{staging + self.geometry.block_bytes}"
            )
        return budget_bytes - staging
