"""DiskTier: the disk store seen as a tier (TierStore + SerializedStore) for one KV geometry.

Handles are block ids. Room is reserved at `allocate` with an upper bound of the block's file
size, so a full disk says so before a write starts. With `persist`, saves also go to the
store's shared area, where other processes and later runs find them (`probe`, `load_block`,
`adopt`); without, to this process's area only. It stores; it never chooses what to keep.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from kvtier.blocks import BlockMeta, Tier
from kvtier.errors import BudgetError, KVTierError, StoreCorruptError
from kvtier.layout import KVGeometry
from kvtier.tiers.base import SerializedEndpoints
from kvtier.tiers.codec import CHUNK_BYTES
from kvtier.tiers.disk.format import ReadResult
from kvtier.tiers.disk.store import DiskStore


def max_file_bytes(geometry: KVGeometry) -> int:
    """An upper bound of one block's file: lz4's worst case per chunk plus a generous header."""
    raw = geometry.layer_block_bytes
    chunks = -(-raw // CHUNK_BYTES)
    per_tensor = raw + raw // 255 + 20 * chunks + 8  # LZ4_compressBound, chunk table, head
    return geometry.tiered_layers * (per_tensor + 384) + 512


class DiskTier(SerializedEndpoints):
    """A DiskStore holding whole blocks, one `l{layer_id}.kv` tensor per tiered layer.

    `persist` (disk.persist): saves go to the shared area too, and outlive this process (GC
    aside); else they stay in this process's area and go at `free` or close. `owns_store`: the
    tier created `store`, so `close()` closes it.
    """

    tier = Tier.DISK
    holds_open_blocks = False  # a stored block is keyed by its content id: sealed blocks only

    def __init__(
        self,
        store: DiskStore,
        geometry: KVGeometry,
        *,
        persist: bool = False,
        owns_store: bool = False,
    ) -> None:
        self.store = store
        self.geometry = geometry
        self.persist = persist
        self.owns_store = owns_store
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

    def reserve(self, slots: int) -> bool:
        """Files are written as blocks arrive; nothing to prepare ahead."""
        return False

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
        """Forget this copy; never raises. A persisted block stays in the shared area."""
        with self._lock:
            self._reserved.pop(key, None)
        self.store.delete(key)

    def set_limit(self, limit_bytes: int) -> list[str]:
        # a block held only here has nowhere slower to go: the caller refuses a limit below use
        self.store.budget_bytes = limit_bytes
        return []

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
        tensors = {name: self.layer_buffer() for name in self._names}
        result = self.store.read_into(key, tensors)
        if result is ReadResult.CORRUPT:
            raise StoreCorruptError(f"disk block {key} failed verification (quarantined)")
        if result is ReadResult.MISSING:
            raise KVTierError(f"disk block {key} is missing: its file was deleted outside kvtier")
        permuted = {name: t.index_select(2, rows.to("cpu")) for name, t in tensors.items()}
        self.save(new_key, tuple(permuted.values()), parent_id=parent_id)
        self.store.delete(key)
        return new_key

    def contains(self, key: str) -> bool:
        return self.store.contains(key)

    def page_cached(self, key: str) -> bool | None:
        """None: block `key` has no file; else whether the page cache holds it (DiskStore)."""
        return self.store.in_page_cache(key)

    def close(self) -> None:
        """Drop the reservations; close the store if this tier created it. Never raises."""
        with self._lock:
            self._reserved.clear()
        if self.owns_store:
            self.store.close()

    # -- SerializedStore (the mover runs these in its I/O threads) -----------------------------
    def load_into(self, key: str, tiered_index: int, out: torch.Tensor) -> ReadResult:
        """Tiered layer `tiered_index` of block `key` into `out`; works for any stored block,
        also one written by another process. Falsy (MISSING or CORRUPT) when it cannot.

        A step reads a block's layers on several I/O threads: the first to find it corrupt moves
        the file aside and the others find none. They say CORRUPT too, so the error a step
        raises says why the block is gone whichever layer it waited on first."""
        result = self.store.read_tensor_into(key, self._names[tiered_index], out)
        if result is ReadResult.MISSING and self.store.reader.was_quarantined(key):
            return ReadResult.CORRUPT
        return result

    def save(
        self,
        key: str,
        layers: tuple[torch.Tensor, ...],
        *,
        parent_id: str | None,
        persist: bool | None = None,
    ) -> int:
        """Store every layer of block `key`; `persist` None means the tier's `persist`."""
        try:
            tensors = dict(zip(self._names, layers, strict=True))
            return self.store.write_block(
                key,
                tensors,
                parent_id=parent_id,
                persist=self.persist if persist is None else persist,
                tokens=self.geometry.block_tokens,
            )
        finally:
            with self._lock:
                self._reserved.pop(key, None)

    # -- reuse: blocks stored by this or any other process -------------------------------------
    def probe(self, key: str) -> ReadResult:
        """Whether block `key` is stored with a valid header (one open and header read; the
        payload checksums are checked when it is loaded)."""
        return self.store.probe(key)

    def stored_prefix(self, keys: Sequence[str]) -> int:
        """How many of `keys` (a chain of block ids, first to last) have a file, from the first:
        one stat each, as the remote tier asks STRLEN. A file that then fails its checks is a
        failed load (quarantined): the reuse stops there. Parsing each header here instead cost
        ~0.3 ms a block of 32 layers under the GIL, paid again by the load, and in full when the
        cost model then chose to recompute."""
        for count, key in enumerate(keys):
            if not self.store.contains(key):
                return count
        return len(keys)

    def load_block(self, key: str, layers: Sequence[torch.Tensor]) -> ReadResult:
        """Every tiered layer of block `key` into `layers[tiered_index]` (each a contiguous CPU
        tensor of `[block_tokens, 2, batch, kv_heads, head_dim]` elements; pinned is fine),
        opening the file once. Falsy when missing or corrupt (quarantined): recompute then."""
        if len(layers) != len(self._names):
            raise KVTierError(
                f"load_block needs {len(self._names)} layer tensors, got {len(layers)}"
            )
        return self.store.read_into(key, dict(zip(self._names, layers, strict=True)))

    def adopt(self, key: str) -> str | None:
        """Make stored block `key` this tier's copy without writing it (pinned against GC while
        held): the handle, or None if it is not stored or does not fit the budget."""
        with self._lock:
            held = self.store.bytes_used + sum(self._reserved.values())
            if held + self._block_bound > self.limit_bytes:
                return None
        try:
            return key if self.store.adopt(key) is not None else None
        except BudgetError:
            return None

    def publish(self, key: str) -> bool:
        """Put a block this tier holds into the shared area (a hard link, no rewrite); e.g. once
        it was reused `admit_after_hits` times. True if it is shared now."""
        return self.store.publish(key)

    def stats(self) -> dict[str, object]:
        figures = self.store.stats()
        return {
            "codec": figures["codec"],
            "io_s": figures["write_s"] + figures["read_s"],
            "missing": figures["missing"],
            "quarantined": figures["quarantined"],
        }
