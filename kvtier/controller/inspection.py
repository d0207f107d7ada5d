"""What tests, benchmarks and `stats()` read off a controller; nothing here changes a block.

A mixin of TierController: it uses the controller's table, stores, mover and counters.
"""

from __future__ import annotations

import torch

from kvtier.blocks import Tier
from kvtier.controller.stats import build_stats
from kvtier.errors import KVTierError, StoreCorruptError
from kvtier.tiers.base import TierStore
from kvtier.transfer import Lane


class Inspection:
    """stats(), check_invariants(), read_block(), read_layer() and the disk store of a
    TierController."""

    def stats(self) -> dict:
        return build_stats(
            counters=self.counters,
            stores=self.stores,
            budgets=self.placement.budgets,
            staging_bytes=self.staging.bytes_used,
            table=self.table,
            tokens=self.tokens,
            block_bytes=self.geometry.block_bytes,
            transfer=self.mover.stats(),
            persist=self.placement.persist.counts,
        )

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests; cheap enough for debugging runs)."""
        self.placement.check_invariants()

    def read_block(self, index: int, tiered_index: int) -> torch.Tensor:
        """Copy of one block's committed `[tokens, 2, batch, kv_heads, head_dim]` for one layer."""
        block = self.table[index]
        g = self.geometry
        out = torch.empty((g.block_tokens, *g.token_shape), dtype=g.dtype)
        tier = block.fastest_tier()
        ticket = self.mover.submit(
            [(self.stores[tier].source(block.slots[tier], tiered_index), out)], lane=Lane.NOW
        )
        if not self.mover.finish(ticket):
            raise StoreCorruptError(
                f"disk block {block.block_id} is missing or corrupt (quarantined); its "
                "tokens cannot be recomputed inside this cache: re-run the prompt"
            )
        return out[: min(g.block_tokens, self.tokens - index * g.block_tokens)]

    def read_layer(self, tiered_index: int) -> torch.Tensor:
        """A copy of one tiered layer's committed K/V `[tokens, 2, batch, kv_heads, head_dim]`
        on the layer's device, gathered from every tier (one copy per block; not for the
        decode path). The caller owns it: writing to it never reaches a tier."""
        if self.in_step:
            raise KVTierError("a layer's K/V cannot be read in the middle of a forward pass")
        g = self.geometry
        device = g.layer_devices[tiered_index]
        out = torch.empty(
            (len(self.table) * g.block_tokens, *g.token_shape), dtype=g.dtype, device=device
        )
        copies = []
        for block in self.table:
            tier = block.fastest_tier()
            start = block.index * g.block_tokens
            source = self.stores[tier].source(block.slots[tier], tiered_index)
            copies.append((source, out[start : start + g.block_tokens]))
        if copies and not self.mover.finish(self.mover.submit(copies, lane=Lane.NOW)):
            raise StoreCorruptError(
                "a disk block of this cache is missing or corrupt (quarantined); its tokens "
                "cannot be recomputed inside this cache: re-run the prompt"
            )
        return out[: self.tokens]

    @property
    def disk(self) -> TierStore | None:
        return self.stores.get(Tier.DISK)
