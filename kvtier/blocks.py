"""Block identity and bookkeeping: BlockId (chained content hash), BlockMeta, BlockTable.

Holds metadata only; never a tensor. Ids use sha256, never Python's hash(), so they are equal
across processes and restarts.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

ID_BYTES = 16  # sha256 truncated to 128 bits, hex-encoded
# Version of what a block id and a stored block mean (the id recipe and the block-file layout).
# The model fingerprint includes it, so blocks of another version are never mistaken for ours.
# 2: block files checksum tensors with xxh3-128 (sha256 in signed remote values) and name the
# algorithm in their header; 1 used blake2b-128 (still read by `kvtier store`, never reused).
FORMAT_VERSION = "2"
READABLE_FORMATS = ("1", "2")  # block files this kvtier can still read and verify, oldest first


class Tier(enum.IntEnum):
    """Where a copy of a block can live, fastest first."""

    GPU = 0
    HOST = 1
    DISK = 2
    REMOTE = 3  # a Valkey server or cluster many processes share (tiers/remote/)


def block_id(parent_id: str | None, token_ids: Sequence[int] | bytes, fingerprint: str) -> str:
    """Chained content id of a sealed block: sha256(parent ‖ token ids ‖ model fingerprint)[:128 bits].

    `token_ids` are all the block's token ids, row-major over the batch (little-endian int64), or
    raw bytes for an anonymous block (tokens unknown). Equal ids mean equal prefixes.
    """
    h = hashlib.sha256()
    h.update((parent_id or "root").encode())
    h.update(b"\x00")
    if isinstance(token_ids, bytes):
        h.update(b"raw:")
        h.update(token_ids)
    else:
        h.update(np.asarray(token_ids, dtype="<i8").tobytes())  # one call, not one per token
    h.update(b"\x00")
    h.update(fingerprint.encode())
    return h.hexdigest()[: 2 * ID_BYTES]


@dataclass(slots=True)
class BlockMeta:
    """One block: `block_tokens` positions of the sequence (all batch rows, all tiered layers).

    `slots` maps a tier to the handle of its copy there, as that tier's store handed it out
    (a slot number in memory tiers, a key in the disk store). A sealed block has an id; the open
    (last, partly filled) one has none.
    """

    index: int
    tokens: int = 0
    block_id: str | None = None
    # token ids per batch row for the filled positions; None when the caller gave no ids
    token_ids: list[list[int]] | None = field(default_factory=list)
    slots: dict[Tier, int | str] = field(default_factory=dict)
    last_access: int = 0
    access_count: int = 0
    pins: int = 0

    def extend_ids(self, rows: list[list[int]] | None) -> None:
        """Append new positions' token ids, one list per batch row (None: tokens unknown from
        here on, so the block will get an anonymous id)."""
        if self.token_ids is None:
            return
        if rows is None:
            self.token_ids = None
            return
        if not self.token_ids:
            self.token_ids = [[] for _ in rows]
        for row, extra in zip(self.token_ids, rows, strict=True):
            row.extend(extra)

    @property
    def sealed(self) -> bool:
        return self.block_id is not None

    @property
    def tiers(self) -> frozenset[Tier]:
        return frozenset(self.slots)

    def fastest_tier(self) -> Tier:
        return min(self.slots)


class BlockTable:
    """The sequence's blocks in position order; block i holds positions [i*bt, (i+1)*bt)."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._blocks: list[BlockMeta] = []

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[BlockMeta]:
        return iter(self._blocks)

    def __getitem__(self, index: int) -> BlockMeta:
        return self._blocks[index]

    @property
    def seq_tokens(self) -> int:
        """Tokens held, over every tier."""
        if not self._blocks:
            return 0
        return (len(self._blocks) - 1) * self.block_tokens + self._blocks[-1].tokens

    def open_block(self) -> BlockMeta:
        """The last block if it has room, else a new empty one appended to the table."""
        if self._blocks and self._blocks[-1].tokens < self.block_tokens:
            return self._blocks[-1]
        block = BlockMeta(index=len(self._blocks))
        self._blocks.append(block)
        return block

    def truncate(self, num_blocks: int) -> list[BlockMeta]:
        """Drop blocks from `num_blocks` on; returns the dropped ones (their slots still set)."""
        dropped = self._blocks[num_blocks:]
        del self._blocks[num_blocks:]
        return dropped

    def in_tier(self, tier: Tier) -> list[BlockMeta]:
        """The blocks holding a copy in `tier`, in position order."""
        return [b for b in self._blocks if tier in b.slots]

    def parent_id(self, block: BlockMeta) -> str | None:
        """Id of the block before `block` (None for the first)."""
        return self._blocks[block.index - 1].block_id if block.index else None

    def seal(self, block: BlockMeta, fingerprint: str) -> str:
        """Give a full block its content id, chained to its parent's; returns the id.

        Tokens unknown (inputs_embeds, a reorder) give a random id: unique, never reused.
        """
        parent = self.parent_id(block)
        if block.token_ids:
            flat = [t for row in block.token_ids for t in row]
            block.block_id = block_id(parent, flat, fingerprint)
        else:
            block.block_id = block_id(parent, b"anon:" + secrets.token_bytes(16), fingerprint)
        return block.block_id
