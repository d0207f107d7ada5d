"""Text a person reads about a run: the tier table, the timing summary, the block map.

Builds strings from `stats()` dictionaries (docs/stats.md) and `Generation.to_dict()`; never
prints (the CLI does) and never touches a cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kvtier.controller.stats import BLOCK_MAP_LEGEND
from kvtier.sizes import format_size

TIERS = ("gpu", "host", "disk")
MAP_WIDTH = 64  # blocks per line of the block map


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as text columns, two spaces apart; every column but the first right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def tier_table(stats: Mapping[str, Any]) -> list[str]:
    """Per tier: tokens and blocks (each block once, in its fastest tier), copies, the KV data
    held and the room reserved, bytes written and read, I/O time."""
    rows = [("TIER", "TOKENS", "BLOCKS", "COPIES", "HELD", "RESERVED", "WRITTEN", "READ", "I/O")]
    for name in TIERS:
        tier = stats.get(name, {})
        io_ms = tier.get("io_ms")
        rows.append(
            (
                name,
                _count(tier.get("tokens")),
                _count(tier.get("unique_blocks")),
                _count(tier.get("blocks")),
                _size(tier.get("bytes_used")),
                _size(tier.get("reserved_bytes")),
                _size(tier.get("bytes_written")),
                _size(tier.get("bytes_read")),
                "-" if io_ms is None else f"{io_ms / 1e3:.2f} s",
            )
        )
    return columns(rows)


def summary_lines(generation: Mapping[str, Any], stats: Mapping[str, Any]) -> list[str]:
    """Time to first token, decode speed, memory peaks, prefix reuse and the prefetch stall,
    from `Generation.to_dict()` and the cache's stats."""
    gpu_peak = generation.get("peak_gpu_bytes")
    timings = stats.get("timings", {})
    return [
        f"time to first token {generation['ttft_s']:.2f} s ({generation['prompt_tokens']} prompt "
        f"tokens, {generation['prefill_tok_s']:.0f} tok/s); decode "
        f"{generation['decode_tok_s']:.1f} tok/s ({generation['new_tokens']} tokens); "
        f"{generation['seconds']:.2f} s in all",
        f"peak GPU memory {'n/a (no CUDA)' if gpu_peak is None else format_size(gpu_peak)}; "
        f"peak host RSS {format_size(generation['peak_rss_bytes'])}",
        f"prefix tokens reused {stats.get('prefix_hit_tokens', 0)}; prefetch stall "
        f"{timings.get('prefetch_stall_ms', 0.0) / 1e3:.2f} s; "
        f"gathers {timings.get('gathers', 0)} ({timings.get('sync_gathers', 0)} not prefetched)",
    ]


def block_map_lines(letters: str, block_tokens: int) -> list[str]:
    """The block map, MAP_WIDTH blocks a line, each line led by its first token's position."""
    if not letters:
        return ["block map: no blocks (nothing tiered)"]
    lines = [f"block map, {block_tokens} tokens per block: {BLOCK_MAP_LEGEND}"]
    width = len(str((len(letters) - 1) // MAP_WIDTH * MAP_WIDTH * block_tokens))
    for start in range(0, len(letters), MAP_WIDTH):
        lines.append(f"{start * block_tokens:>{width}}  {letters[start : start + MAP_WIDTH]}")
    return lines


def _count(value: object) -> str:
    return "-" if value is None else str(value)


def _size(value: object) -> str:
    return "-" if value is None else format_size(int(value))
