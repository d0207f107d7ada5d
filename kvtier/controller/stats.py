"""Counters of one controller, and the `stats()` dictionary built from them.

Counting only: nothing here moves a block or changes a budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.blocks import BlockTable, Tier
from kvtier.tiers.base import TierStore


@dataclass
class TierCounters:
    bytes_written: int = 0
    bytes_read: int = 0


@dataclass
class Counters:
    tiers: dict[Tier, TierCounters] = field(
        default_factory=lambda: {t: TierCounters() for t in Tier}
    )
    steps: int = 0
    gathers: int = 0
    sync_gathers: int = 0
    promotions: int = 0
    demotions: int = 0
    gather_s: float = 0.0


def build_stats(
    *,
    counters: Counters,
    stores: dict[Tier, TierStore],
    budgets: dict[Tier, int],
    staging_bytes: int,
    table: BlockTable,
    tokens: int,
    block_bytes: int,
    transfer: dict,
) -> dict:
    """The JSON-ready stats of one controller (the schema `TieredCache.stats()` returns)."""
    top = min(stores)
    out: dict = {}
    for tier in Tier:
        store = stores.get(tier)
        extra = dict(store.stats()) if store is not None else {}
        io_s = float(extra.pop("io_s", 0.0))
        used = store.bytes_used if store is not None else 0
        entry = {
            "bytes_used": used + (staging_bytes if tier is top else 0),
            "blocks": sum(1 for b in table if tier in b.slots),
            "bytes_written": counters.tiers[tier].bytes_written,
            "bytes_read": counters.tiers[tier].bytes_read,
            "io_ms": round(io_s * 1e3, 3),
            "budget_bytes": budgets.get(tier, 0),
            **extra,
        }
        if tier is top:
            entry["staging_bytes"] = staging_bytes
        out[tier.name.lower()] = entry
    return out | {
        "tokens": tokens,
        "blocks": len(table),
        "block_tokens": table.block_tokens,
        "block_bytes": block_bytes,
        "steps": counters.steps,
        "timings": {
            "gather_ms": round(counters.gather_s * 1e3, 3),
            "gathers": counters.gathers,
            "sync_gathers": counters.sync_gathers,
            "promotions": counters.promotions,
            "demotions": counters.demotions,
        },
        "transfer": transfer,
    }
