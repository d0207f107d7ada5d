"""`lfu`: least frequently used first; ties by recency, then position."""

from __future__ import annotations

from kvtier.blocks import BlockMeta
from kvtier.policy.base import Policy


class LFUPolicy(Policy):
    """Least frequently used; ties by recency, then position."""

    name = "lfu"

    def sort_key(self, block: BlockMeta) -> tuple:
        return (block.access_count, block.last_access, block.index)
