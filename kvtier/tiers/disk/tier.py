"""DiskTier: the disk store seen as a tier (TierStore + SerializedStore) for one KV geometry.

Handles are block ids. Room is reserved at `allocate` with an upper bound of the block's file
size, so a full disk says so before a write starts. It stores; it never chooses what to keep.
"""

from __future__ import annotations

import threading

import torch

from kvtier.blocks import BlockMeta, Tier
from kvtier.errors import StoreCorruptError
from kvtier.layout import KVGeometry
from kvtier.tiers.base import Stored
from kvtier.tiers.codec import CHUNK_BYTES
from kvtier.tiers.disk.store import DiskStore


def max_file_bytes(geometry: KVGeometry) -> int:
    """An upper bound of one block's file: lz4's worst case per chunk plus a generous header."""
    raw = geometry.layer_block_bytes
    chunks = -(-raw // CHUNK_BYTES)
    per_tensor = raw + raw // 255 + 20 * chunks + 8  # LZ4_compressBound, chunk table, head
    return geometry.tiered_layers * (per_tensor + 384) + 512


class DiskTier:
    """A DiskStore holding whole blocks, one `l{layer_id}.kv` tensor per tiered layer.

    `keep_files`: freeing a copy leaves its file (persist = true; other processes may reuse it).
    """

    tier = Tier.DISK
    holds_open_blocks = False  # a stored block is keyed by its content id: sealed blocks only

    def __init__(self, store: DiskStore, geometry: KVGeometry, *, keep_files: bool) -> None:
        self.store = store
        self.geometry = geometry
        self.keep_files = keep_files
        self._names = tuple(f"l{layer_id}.kv" for layer_id in geometry.layer_ids)
        self._block_bound = max_file_bytes(geometry)
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # key -> bytes promised to a save not yet done

    # -- TierStore -----------------------------------------------------------------------------
    @property
    def limit_bytes(self) -> int:
        return self.store.budget_bytes

    @property
    def bytes_used(self) -> int:
        return self.store.bytes_used

    def capacity_blocks(self) -> int:
        return self.limit_bytes // self._block_bound

    def room_blocks(self) -> int:
        with self._lock:
            held = self.store.bytes_used + sum(self._reserved.values())
        return (self.limit_bytes - held) // self._block_bound

    def allocate(self, block: BlockMeta | None = None) -> str | None:
        assert block is not None and block.block_id is not None, "only sealed blocks go to disk"
        key = block.block_id
        with self._lock:
            held = self.store.bytes_used + sum(self._reserved.values())
            if key in self._reserved or held + self._block_bound > self.limit_bytes:
                return None
            self._reserved[key] = self._block_bound
        return key

    def free(self, key: str) -> None:
        with self._lock:
            self._reserved.pop(key, None)
        if not self.keep_files:
            self.store.delete(key)

    def set_limit(self, limit_bytes: int) -> list[str]:
        # a block held only here has nowhere slower to go: the caller refuses a limit below use
        self.store.budget_bytes = limit_bytes
        return []

    def release(self) -> None:
        pass

    def contiguous(self, first: str, second: str) -> bool:
        return False

    def source(self, key: str, tiered_index: int, count: int = 1) -> Stored:
        assert count == 1, "disk blocks are read one at a time"
        return Stored(self, key, tiered_index)

    def block_source(self, key: str) -> Stored:
        return Stored(self, key)

    def block_target(self, key: str, *, parent_id: str | None) -> Stored:
        return Stored(self, key, parent_id=parent_id)

    def reorder_rows(
        self,
        key: str,
        rows: torch.Tensor,
        *,
        old_key: str | None,
        new_key: str | None,
        parent_id: str | None,
    ) -> str:
        """Rewrite a block with its batch rows permuted under its new id (the content changed)."""
        if new_key is None or new_key == key:
            return key  # rows unchanged by this reorder (e.g. the prompt all beams share)
        tensors = self.store.read_block(key)
        if tensors is None:
            raise StoreCorruptError(f"disk block {key} is missing or corrupt (quarantined)")
        permuted = {name: t.index_select(2, rows.to("cpu")) for name, t in tensors.items()}
        self.store.write_block(new_key, permuted, parent_id=parent_id)
        if not self.keep_files:
            self.store.delete(key)
        return new_key

    def contains(self, key: str) -> bool:
        return self.store.contains(key)

    def close(self) -> None:
        with self._lock:
            self._reserved.clear()

    # -- SerializedStore (the mover runs these in its I/O threads) -----------------------------
    def load_into(self, key: str, tiered_index: int, out: torch.Tensor) -> bool:
        return self.store.read_tensor_into(key, self._names[tiered_index], out)

    def save(self, key: str, layers: tuple[torch.Tensor, ...], *, parent_id: str | None) -> int:
        try:
            tensors = dict(zip(self._names, layers, strict=True))
            return self.store.write_block(key, tensors, parent_id=parent_id)
        finally:
            with self._lock:
                self._reserved.pop(key, None)

    def stats(self) -> dict[str, object]:
        figures = self.store.stats()
        return {"codec": figures["codec"], "io_s": figures["write_s"] + figures["read_s"]}
