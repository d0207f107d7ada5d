"""`sink_recent`: attention sinks and the recent window stay on the GPU; the middle streams, LRU."""

from __future__ import annotations

from kvtier.blocks import BlockMeta
from kvtier.policy.base import Policy


class SinkRecentPolicy(Policy):
    """Attention sinks (first `sink_tokens`) and the last `recent_tokens` never leave the GPU.

    The rest is LRU. With full attention every block is read every step, so this keeps the
    positions attention weighs most on the GPU and streams the middle.
    """

    name = "sink_recent"

    def pinned(self, block: BlockMeta, seq_tokens: int) -> bool:
        start = block.index * self.block_tokens
        end = start + self.block_tokens
        in_sink = start < self.cfg.sink_tokens
        in_recent = end > seq_tokens - self.cfg.recent_tokens
        return block.pins > 0 or in_sink or in_recent

    def max_pinned_blocks(self) -> int:
        bt = self.block_tokens
        return -(-self.cfg.sink_tokens // bt) + -(-self.cfg.recent_tokens // bt)
