"""The TierStore protocol: what the controller asks of every tier (GPU, host, disk; remote next).

A store keeps copies of blocks and reports its bytes; it never chooses what to keep (the
controller decides) and never copies on its own (the mover does, from `source` to `target`).
Memory stores hand out tensor views; serialized stores hand out `Stored` references, which the
mover resolves with `load_into` / `save` in its I/O threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from kvtier.blocks import BlockMeta, Tier
from kvtier.layout import KVGeometry

Handle = int | str  # a slot number (memory stores) or a key (serialized stores)


@dataclass(frozen=True, slots=True)
class Stored:
    """A block in a serialized store: one tiered layer of it, or every layer (`tiered_index` None).

    `parent_id` is recorded when the block is saved (it names the block before it).
    """

    store: SerializedStore
    key: str
    tiered_index: int | None = None
    parent_id: str | None = None


# what one side of a copy is: a tensor view, every layer's view of one block, or a stored block
Endpoint = torch.Tensor | tuple[torch.Tensor, ...] | Stored


@runtime_checkable
class TierStore(Protocol):
    """Room for block copies under a byte limit.

    Contracts: `allocate` returns None when full and then changes nothing; a handle is valid
    until `free`; `set_limit` returns the handles that must move out before `release()` frees
    the room above the new limit; `bytes_used` never exceeds `limit_bytes` after `release()`.
    """

    tier: Tier
    limit_bytes: int
    holds_open_blocks: bool  # False: only sealed blocks (keyed by content id) can be stored

    @property
    def bytes_used(self) -> int: ...

    def capacity_blocks(self) -> int: ...

    def room_blocks(self) -> int:
        """Blocks that can still be allocated without moving anything out."""
        ...

    def reserve(self, slots: int) -> bool:
        """Prepare room for `slots` blocks ahead of need (may do nothing); True if it did."""
        ...

    def stats(self) -> dict[str, object]:
        """Tier-specific figures for the cache's `stats()` (an "io_s" key counts I/O seconds)."""
        ...

    def allocate(self, block: BlockMeta | None = None) -> Handle | None: ...

    def free(self, handle: Handle) -> None: ...

    def set_limit(self, limit_bytes: int) -> list[Handle]: ...

    def release(self) -> None: ...

    def contiguous(self, first: Handle, second: Handle) -> bool:
        """True if one copy can move `first` and `second` (which follows it) together."""
        ...

    def source(self, handle: Handle, tiered_index: int, count: int = 1) -> Endpoint:
        """What to copy from for tiered layer `tiered_index` of `count` blocks starting at `handle`
        (count > 1 only for runs `contiguous` allows): `[count * block_tokens, 2, batch,
        kv_heads, head_dim]`."""
        ...

    def block_source(self, handle: Handle) -> Endpoint:
        """What to copy from for every layer of one block."""
        ...

    def block_target(self, handle: Handle, *, parent_id: str | None) -> Endpoint:
        """What to copy into for every layer of one block."""
        ...

    def reorder_rows(
        self,
        handle: Handle,
        rows: torch.Tensor,
        *,
        old_key: str | None,
        new_key: str | None,
        parent_id: str | None,
    ) -> Handle:
        """Permute the batch rows of one block (beam search); returns its handle afterwards
        (a serialized store re-keys it: `new_key` is the block's id after the reorder)."""
        ...

    def close(self) -> None: ...


class SerializedEndpoints:
    """The TierStore methods every serialized store (disk, remote) shares: handles are block
    keys, every copy is a whole `Stored` block or one layer of it, and nothing is held in
    contiguous runs; `layer_buffer()` is one layer of one block in host memory, as
    `load_block` fills it. The class sets `geometry`."""

    geometry: KVGeometry

    def release(self) -> None:
        pass

    def contiguous(self, first: str, second: str) -> bool:
        return False

    def source(self, key: str, tiered_index: int, count: int = 1) -> Stored:
        assert count == 1, "serialized blocks are read one at a time"
        return Stored(self, key, tiered_index)

    def block_source(self, key: str) -> Stored:
        return Stored(self, key)

    def block_target(self, key: str, *, parent_id: str | None) -> Stored:
        return Stored(self, key, parent_id=parent_id)

    def layer_buffer(self) -> torch.Tensor:
        g = self.geometry
        return torch.empty((g.block_tokens, *g.token_shape), dtype=g.dtype)


@runtime_checkable
class SerializedStore(Protocol):
    """The blocking I/O a serialized store offers the mover (run in its I/O threads)."""

    def load_into(self, key: str, tiered_index: int, out: torch.Tensor) -> bool:
        """Fill `out` (a CPU tensor `[block_tokens, 2, batch, kv_heads, head_dim]`) with tiered
        layer `tiered_index` of block `key`; False if the block is missing or failed verification."""
        ...

    def load_block(self, key: str, layers: Sequence[torch.Tensor]) -> object:
        """Fill every tiered layer of block `key` into `layers[tiered_index]` (contiguous CPU
        tensors, as for `load_into`) with one file open or request; falsy (a ReadResult) if the
        block is missing or failed verification."""
        ...

    def save(self, key: str, layers: tuple[torch.Tensor, ...], *, parent_id: str | None) -> int:
        """Store every layer of block `key` (contiguous CPU tensors, by tiered index); returns
        the bytes written. Raises KVTierError (BudgetError when full) on failure."""
        ...
