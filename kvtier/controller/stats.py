"""Counters of one controller, the `stats()` dictionary built from them, and the block map.

Counting only: nothing here moves a block or changes a budget. docs/stats.md documents every
key of `build_stats`; change both together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.blocks import BlockMeta, BlockTable, Tier
from kvtier.tiers.base import TierStore

STATS_FORMAT = 2  # bumped when a key changes meaning (2: bytes_used is data, not reservations)


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
    # host seconds a layer waited at its attention for its K/V in staging (the streamed path)
    prefetch_stall_s: float = 0.0
    # prompt tokens whose KV came from stored blocks instead of being computed (prefix reuse)
    prefix_hit_tokens: int = 0
    # the last prefix lookup: decision, reason, predictions (controller/reuse.py); None: none ran
    reuse: dict | None = None


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
    persist: dict | None = None,
) -> dict:
    """The JSON-ready stats of one controller (the schema `TieredCache.stats()` returns).

    Per tier: `bytes_used` is the KV data its copies hold and `reserved_bytes` what it set
    aside (slabs, staging, files); `blocks` counts copies, `unique_blocks` and `tokens` count
    each block once, in its fastest tier. docs/stats.md has every key.
    """
    top = min(stores)
    token_bytes = block_bytes // table.block_tokens  # one position, every tiered layer
    held = _held(table)
    out: dict = {}
    for tier in Tier:
        entry = _tier_entry(
            stores.get(tier),
            counters.tiers[tier],
            held[tier],
            token_bytes=token_bytes,
            budget_bytes=budgets.get(tier, 0),
            staging_bytes=staging_bytes if tier is top else None,
        )
        out[tier.name.lower()] = entry
    return out | {
        "format": STATS_FORMAT,
        "tokens": tokens,
        "blocks": len(table),
        "block_tokens": table.block_tokens,
        "block_bytes": block_bytes,
        "steps": counters.steps,
        "prefix_hit_tokens": counters.prefix_hit_tokens,
        "reuse": counters.reuse,
        "persist": dict(persist or {}),
        "lost_blocks": sum(1 for block in table if not block.slots),
        "timings": {
            "gather_ms": round(counters.gather_s * 1e3, 3),
            "prefetch_stall_ms": round(counters.prefetch_stall_s * 1e3, 3),
            "gathers": counters.gathers,
            "sync_gathers": counters.sync_gathers,
            "promotions": counters.promotions,
            "demotions": counters.demotions,
        },
        "transfer": transfer,
    }


def _tier_entry(
    store: TierStore | None,
    counted: TierCounters,
    held: tuple[int, int, int, int],
    *,
    token_bytes: int,
    budget_bytes: int,
    staging_bytes: int | None,
) -> dict:
    """One tier's stats; `staging_bytes` is given for the fastest tier only."""
    extra = dict(store.stats()) if store is not None else {}
    io_s = extra.pop("io_s", None)
    copies, unique_blocks, unique_tokens, data_tokens = held
    reserved = (store.bytes_used if store is not None else 0) + (staging_bytes or 0)
    entry = {
        "bytes_used": data_tokens * token_bytes,
        "reserved_bytes": reserved,
        "budget_bytes": budget_bytes,
        "blocks": copies,
        "unique_blocks": unique_blocks,
        "tokens": unique_tokens,
        "bytes_written": counted.bytes_written,
        "bytes_read": counted.bytes_read,
        # only serialized stores time their I/O; memory copies are timed as a whole in timings
        "io_ms": None if io_s is None else round(float(io_s) * 1e3, 3),
        **extra,
    }
    if staging_bytes is not None:
        entry["staging_bytes"] = staging_bytes
    return entry


def _held(table: BlockTable) -> dict[Tier, tuple[int, int, int, int]]:
    """Per tier: (copies, blocks whose fastest copy is here, their tokens, tokens in copies)."""
    copies = dict.fromkeys(Tier, 0)
    unique = dict.fromkeys(Tier, 0)
    unique_tokens = dict.fromkeys(Tier, 0)
    copy_tokens = dict.fromkeys(Tier, 0)
    for block in table:
        if not block.slots:
            continue
        for tier in block.slots:
            copies[tier] += 1
            copy_tokens[tier] += block.tokens
        fastest = block.fastest_tier()
        unique[fastest] += 1
        unique_tokens[fastest] += block.tokens
    return {t: (copies[t], unique[t], unique_tokens[t], copy_tokens[t]) for t in Tier}


BLOCK_MAP_LEGEND = "P pinned on the GPU, G GPU, H host, D disk (each block's fastest copy), X lost"


def block_map(table: BlockTable, *, pinned: Callable[[BlockMeta], bool]) -> str:
    """One character per block in position order: its fastest tier (G, H, D), or P for a
    GPU-resident block the policy pins (`pinned(block)`, e.g. policy.pinned at this length)."""
    letters = {Tier.GPU: "G", Tier.HOST: "H", Tier.DISK: "D"}
    out = []
    for block in table:
        if not block.slots:
            out.append("X")  # its only copy was lost (or a block mid-step, before its slot)
            continue
        tier = block.fastest_tier()
        out.append("P" if tier is Tier.GPU and pinned(block) else letters[tier])
    return "".join(out)
