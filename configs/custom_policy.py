"""middle_out: a placement policy users can ship, the worked example of docs/policies.md.

Attention weighs the first tokens (sinks) and the latest ones most, so this policy keeps
`edge_blocks` blocks at each end of the sequence on the GPU and demotes the blocks farthest
from both ends first. Select it with configs/custom-policy.toml:

    [policy]
    name = "middle_out"
    module = "custom_policy.py"   # this file, relative to the TOML
    [policy.middle_out]
    edge_blocks = 2

A policy only ranks blocks: it never touches a tensor or a slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import kvtier
from kvtier.blocks import BlockMeta


@kvtier.register_policy("middle_out")
class MiddleOut(kvtier.Policy):
    """Pin `edge_blocks` blocks at each end; demote the farthest from both ends first."""

    name = "middle_out"
    settings = {"edge_blocks": 1}  # setting -> default; [policy.middle_out] sets it

    def _distance_to_an_end(self, block: BlockMeta, seq_tokens: int) -> int:
        last = max(seq_tokens - 1, 0) // self.block_tokens
        return min(block.index, last - block.index)

    def pinned(self, block: BlockMeta, seq_tokens: int) -> bool:
        near_an_end = self._distance_to_an_end(block, seq_tokens) < self.settings["edge_blocks"]
        return near_an_end or super().pinned(block, seq_tokens)

    def max_pinned_blocks(self) -> int:
        return 2 * self.settings["edge_blocks"]  # what a GPU budget should leave room for

    def victims(
        self, candidates: Sequence[BlockMeta], count: int, seq_tokens: int
    ) -> list[BlockMeta]:
        free = [b for b in candidates if not self.pinned(b, seq_tokens)]
        farthest_first = sorted(
            free, key=lambda b: (-self._distance_to_an_end(b, seq_tokens), b.index)
        )
        return farthest_first[:count]
