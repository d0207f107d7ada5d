"""One step of appends: the blocks receiving its new tokens, and the copies that put them there.

Plans copies only (staging -> block slots); the controller submits them to the mover.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvtier.blocks import BlockMeta, Tier
from kvtier.tiers.base import Handle, TierStore
from kvtier.transfer import Copy


class PendingIds:
    """Token ids `[batch, q]` on their way from the GPU to pinned host memory: the copy is
    queued without a sync (a blocking `.to("cpu")` per step stalls the decode loop) and read at
    the step's end, when it has long completed."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.shape = tuple(ids.shape)
        self._host = torch.empty(self.shape, dtype=ids.dtype, pin_memory=True)
        self._host.copy_(ids, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(ids.device))

    def tensor(self) -> torch.Tensor:
        self._ready.synchronize()  # waits for the copy only, not for the work queued after it
        return self._host


def host_ids(token_ids: torch.Tensor | None) -> torch.Tensor | PendingIds | None:
    """A step's token ids on the host: copied now from the CPU, on their way from a GPU."""
    if token_ids is None:
        return None
    if token_ids.is_cuda:
        return PendingIds(token_ids.detach())
    return token_ids.detach().to("cpu")


def extend_ids(
    block: BlockMeta,
    ids: torch.Tensor | PendingIds | None,
    offset: int,
    take: int,
    later: list[tuple[BlockMeta, int, int]],
) -> None:
    """Give `block` the ids of the step's `take` positions from `offset`: now, or at the step's
    end when they are still on their way (noted in `later`)."""
    if isinstance(ids, PendingIds):
        later.append((block, offset, take))
    else:
        block.extend_ids(None if ids is None else ids[:, offset : offset + take].tolist())


@dataclass
class Step:
    """The step in progress: `new` positions from `start`, spread over `blocks`."""

    start: int  # committed tokens when the step began
    new: int  # tokens this step appends
    blocks: list[BlockMeta]  # blocks receiving the new tokens, in order
    # in place: every block of the sequence is one run of the fastest tier from this handle, so
    # attention reads (and new tokens go) straight into it, without staging
    run: Handle | None = None
    layers_done: int = 0
    # token ids still being copied from the GPU, and (block, offset in the step, tokens) of
    # each piece they extend at the step's end
    pending_ids: tuple[PendingIds, list[tuple[BlockMeta, int, int]]] | None = None

    def extend_pending_ids(self) -> None:
        if self.pending_ids is None:
            return
        ids, pieces = self.pending_ids
        self.pending_ids = None
        rows = ids.tensor()
        for block, offset, take in pieces:
            block.extend_ids(rows[:, offset : offset + take].tolist())

    @property
    def end(self) -> int:
        return self.start + self.new

    def pieces(self, block_tokens: int) -> Iterator[tuple[BlockMeta, int, int, int]]:
        """(block, first position inside it, tokens, offset in the step) of each block."""
        pos = self.start
        for block in self.blocks:
            first = pos - block.index * block_tokens
            take = min(block.tokens - first, self.end - pos)
            yield block, first, take, pos - self.start
            pos += take


def token_copies(
    step: Step, tiered_index: int, stage: torch.Tensor, stores: dict[Tier, TierStore], top: Tier
) -> list[tuple[Tier, Copy]]:
    """One layer's new tokens from staging into each block's writable copy (the fastest tier
    holding it), with that copy's tier. Whole blocks in consecutive slots of one tier go in
    one copy (a layer-major prefill copies thousands of blocks down at once)."""
    block_tokens = stores[top].geometry.block_tokens
    runs: list[list] = []  # [tier, first handle, last handle, first position, tokens, offset]
    for block, first, take, at in step.pieces(block_tokens):
        tier = top if top in block.slots else block.fastest_tier()
        handle = block.slots[tier]
        last = runs[-1] if runs else None
        whole = first == 0 and take == block_tokens
        if (
            last is not None
            and whole
            and last[0] is tier
            and last[3] == 0
            and last[4] % block_tokens == 0
            and stores[tier].contiguous(last[2], handle)
        ):
            last[2], last[4] = handle, last[4] + take
        else:
            runs.append([tier, handle, handle, first, take, at])
    copies: list[tuple[Tier, Copy]] = []
    for tier, handle, _, first, take, at in runs:
        count = -(-(first + take) // block_tokens)
        view = stores[tier].source(handle, tiered_index, count)
        pos = step.start + at
        copies.append((tier, (stage[pos : pos + take], view[first : first + take])))
    return copies
