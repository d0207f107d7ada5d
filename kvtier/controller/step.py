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
    """A step's token ids `[batch, q]` on their way to the host, read at the step's end: from a
    GPU the copy into pinned memory is queued without a sync (a blocking `.to("cpu")` per step
    stalls the decode loop) and has long completed by then; from the CPU they are there."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.shape = tuple(ids.shape)
        self._ready: torch.cuda.Event | None = None
        if not ids.is_cuda:
            self._host = ids.detach().to("cpu")
            return
        self._host = torch.empty(self.shape, dtype=ids.dtype, pin_memory=True)
        self._host.copy_(ids.detach(), non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(ids.device))

    def tensor(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()  # waits for the copy only, not for work queued after it
        return self._host


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
    # the step's token ids (None: unknown, so its blocks get anonymous ids), and (block, offset
    # in the step, tokens) of each piece they extend at the step's end
    pending_ids: tuple[PendingIds | None, list[tuple[BlockMeta, int, int]]] | None = None
    layer_bytes: int = 0  # bytes each layer appends (K and V of the new positions)
    _positions: torch.Tensor | None = None

    def positions(self, like: torch.Tensor) -> torch.Tensor:
        """`arange(start, end)` on `like`'s device: made once a step, shared by its layers."""
        made = self._positions
        if made is None or made.device != like.device:
            made = self._positions = torch.arange(self.start, self.end, device=like.device)
        return made

    def extend_pending_ids(self) -> None:
        if self.pending_ids is None:
            return
        ids, pieces = self.pending_ids
        self.pending_ids = None
        rows = None if ids is None else ids.tensor()
        for block, offset, take in pieces:
            block.extend_ids(None if rows is None else rows[:, offset : offset + take].tolist())

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
