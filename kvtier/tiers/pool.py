"""SlabPool: fixed-size block slots carved out of a few large slabs, grown lazily up to a limit.

The memory store of the GPU and host tiers. A slab holds, per device, one tensor
`[layers_on_device, slab_slots, block_tokens, 2, batch, kv_heads, head_dim]`, so a run of
consecutive slots of one layer is one contiguous range: one copy moves it. The pool stores;
it never decides which block lives where.
"""

from __future__ import annotations

import heapq

import torch

from kvtier.blocks import BlockMeta, Tier
from kvtier.errors import BudgetError
from kvtier.layout import KVGeometry

GiB = 1 << 30


class SlabPool:
    """Block slots in slabs; `bytes_used` is the bytes of the slabs actually allocated.

    Implements the TierStore protocol (tiers/base.py) for memory: handles are slot numbers and
    endpoints are tensor views. `geometry.layer_devices[i]` is where tiered layer i lives here.
    """

    tier = Tier.GPU
    holds_open_blocks = True

    def __init__(
        self,
        geometry: KVGeometry,
        *,
        limit_bytes: int,
        slab_slots: int | None = None,
        max_slab_bytes: int = GiB,
    ) -> None:
        self.geometry = geometry
        self.limit_bytes = limit_bytes
        self.slot_bytes = geometry.block_bytes
        if slab_slots is None:
            # few slabs keep slot runs long (one copy each); a quarter of the limit, up to 1 GiB
            target = min(max_slab_bytes, max(limit_bytes // 4, self.slot_bytes))
            slab_slots = max(1, target // self.slot_bytes)
        self.slab_slots = slab_slots
        # layer -> (device group, index among that device's layers)
        self._devices = list(geometry.devices)
        self._local: list[tuple[int, int]] = []
        for device in geometry.layer_devices:
            group = self._devices.index(device)
            local = sum(1 for d in self._local if d[0] == group)
            self._local.append((group, local))
        self._slabs: list[list[torch.Tensor]] = []
        self._slab_counts: list[int] = []
        self._free: list[int] = []  # heap of free slots in allocated slabs
        self._used: set[int] = set()

    # -- accounting ----------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return sum(self._slab_counts) * self.slot_bytes

    @property
    def used_slots(self) -> int:
        return len(self._used)

    def capacity_blocks(self, limit_bytes: int | None = None) -> int:
        limit = self.limit_bytes if limit_bytes is None else limit_bytes
        return limit // self.slot_bytes

    def reserve(self, slots: int) -> bool:
        """Slabs grow as blocks arrive; nothing to prepare ahead here."""
        return False

    def room_blocks(self) -> int:
        """Slots that can still be allocated without moving anything out."""
        return self.capacity_blocks() - self.used_slots

    def stats(self) -> dict[str, object]:
        """Tier-specific figures for `stats()` (the slabs held, by default)."""
        return {"slot_bytes": self.bytes_used}

    def require(self, slots: int, what: str) -> None:
        """Raise BudgetError unless the limit can ever hold `slots` slots."""
        if self.capacity_blocks() < slots:
            need = slots * self.slot_bytes
            raise BudgetError(
                f"{self.tier.name.lower()} budget {self.limit_bytes} bytes cannot hold {what}: "
                f"need at least {need} bytes ({slots} blocks of {self.slot_bytes} bytes)"
            )

    # -- slots ---------------------------------------------------------------------------------
    def allocate(self, block: BlockMeta | None = None) -> int | None:
        """Lowest free slot, growing a slab if the limit allows; None when full."""
        while self._free:
            slot = heapq.heappop(self._free)
            if slot not in self._used and self._slab_of(slot) is not None:
                self._used.add(slot)
                return slot
        if not self._grow():
            return None
        return self.allocate()

    def free(self, slot: int) -> None:
        self._used.discard(slot)
        heapq.heappush(self._free, slot)

    def contiguous(self, first: int, second: int) -> bool:
        """True if slot `second` directly follows `first` inside one slab (one copy moves both)."""
        return second == first + 1 and first // self.slab_slots == second // self.slab_slots

    # -- views (the endpoints the mover copies between) ----------------------------------------
    def source(self, slot: int, tiered_index: int, count: int = 1) -> torch.Tensor:
        """`[count * block_tokens, 2, batch, kv_heads, head_dim]` contiguous view of a slot run."""
        slab_index, first = divmod(slot, self.slab_slots)
        assert first + count <= self._slab_counts[slab_index], "run crosses a slab boundary"
        group, local = self._local[tiered_index]
        view = self._slabs[slab_index][group][local, first : first + count]
        return view.reshape(count * self.geometry.block_tokens, *self.geometry.token_shape)

    def block_source(self, slot: int) -> tuple[torch.Tensor, ...]:
        """Every tiered layer's view of one slot, by tiered index."""
        return tuple(self.source(slot, i) for i in range(self.geometry.tiered_layers))

    def block_target(self, slot: int, *, parent_id: str | None = None) -> tuple[torch.Tensor, ...]:
        return self.block_source(slot)

    def reorder_rows(self, slot: int, rows: torch.Tensor, **keys: object) -> int:
        """Permute the batch rows of every layer of one slot in place (beam search)."""
        for tiered_index in range(self.geometry.tiered_layers):
            view = self.source(slot, tiered_index)  # [block_tokens, 2, batch, kv_heads, head_dim]
            view.copy_(view.index_select(2, rows.to(view.device)))
        return slot

    def slot_view(self, slot: int) -> torch.Tensor:
        """`[layers, block_tokens, 2, batch, kv_heads, head_dim]` of one slot (one device only)."""
        assert self.geometry.single_device
        index, offset = divmod(slot, self.slab_slots)
        return self._slabs[index][0][:, offset]

    # -- limit changes -------------------------------------------------------------------------
    def set_limit(self, limit_bytes: int) -> list[int]:
        """Lower or raise the limit; returns occupied slots in slabs that no longer fit.

        The caller moves those blocks elsewhere, frees their slots, then calls `release()`.
        """
        self.limit_bytes = limit_bytes
        excess = self._excess_slabs()
        return [s for s in sorted(self._used) if s // self.slab_slots in excess]

    def release(self) -> None:
        """Free the trailing slabs over the limit (they must be empty by now)."""
        for index in sorted(self._excess_slabs(), reverse=True):
            assert not any(s // self.slab_slots == index for s in self._used)
            self._pop_slab()

    def close(self) -> None:
        while self._slabs:
            self._pop_slab()
        self._free.clear()
        self._used.clear()

    # -- internals -----------------------------------------------------------------------------
    def _slab_of(self, slot: int) -> int | None:
        index, offset = divmod(slot, self.slab_slots)
        if index >= len(self._slabs):
            return None
        return index if offset < self._slab_counts[index] else None

    def _excess_slabs(self) -> set[int]:
        """The highest slabs to drop so the rest fits the limit (slabs go from the top only)."""
        excess, total = set(), self.bytes_used
        for index in range(len(self._slabs) - 1, -1, -1):
            if total <= self.limit_bytes:
                break
            excess.add(index)
            total -= self._slab_counts[index] * self.slot_bytes
        return excess

    def _grow(self) -> bool:
        if self._slabs and self._slab_counts[-1] < self.slab_slots:
            # a short last slab (cut by the limit) is replaced when empty; when in use, the next
            # slab starts at the next slab boundary and the short one keeps a gap of slot numbers
            last = len(self._slabs) - 1
            if not any(s // self.slab_slots == last for s in self._used):
                self._pop_slab()
        room = (self.limit_bytes - self.bytes_used) // self.slot_bytes
        if room <= 0:
            return False
        count = min(self.slab_slots, room)
        self._slabs.append([self._allocate_slab(device, count) for device in self._devices])
        self._slab_counts.append(count)
        base = (len(self._slabs) - 1) * self.slab_slots
        for slot in range(base, base + count):
            heapq.heappush(self._free, slot)
        return True

    def _layers_on(self, device: torch.device) -> int:
        group = self._devices.index(device)
        return sum(1 for g, _ in self._local if g == group)

    def _slab_shape(self, device: torch.device, count: int) -> tuple[int, ...]:
        """[layers_on_device, count, block_tokens, 2, batch, kv_heads, head_dim]"""
        g = self.geometry
        return (self._layers_on(device), count, g.block_tokens, *g.token_shape)

    def _allocate_slab(self, device: torch.device, count: int) -> torch.Tensor:
        shape = self._slab_shape(device, count)
        return torch.empty(shape, dtype=self.geometry.dtype, device=device)

    def _free_slab_tensor(self, tensor: torch.Tensor) -> None:
        """Hook for subclasses that must undo something (host unpinning)."""

    def _pop_slab(self) -> None:
        index = len(self._slabs) - 1
        for tensor in self._slabs.pop():
            self._free_slab_tensor(tensor)
        self._slab_counts.pop()
        self._free = [s for s in self._free if s // self.slab_slots != index]
        heapq.heapify(self._free)
