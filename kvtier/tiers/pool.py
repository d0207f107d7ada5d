"""SlabPool: fixed-size block slots carved out of a few large slabs, grown lazily up to a budget.

Shared by the GPU and host tiers. A slab holds, per device, one tensor
`[layers_on_device, slab_slots, block_tokens, 2, batch, kv_heads, head_dim]`, so a run of
consecutive slots of one layer is one contiguous range: one copy moves it. The pool stores;
it never decides which block lives where.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import BudgetError

GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class SlotLayout:
    """Shape of one block slot. `layer_devices[i]` is where tiered layer i lives in this pool."""

    layer_devices: tuple[torch.device, ...]
    block_tokens: int
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def layers(self) -> int:
        return len(self.layer_devices)

    @property
    def token_shape(self) -> tuple[int, int, int, int]:
        # one position of one layer, K and V side by side: [2, batch, kv_heads, head_dim]
        return (2, self.batch, self.kv_heads, self.head_dim)

    @property
    def token_bytes(self) -> int:
        """Bytes of one position of one layer (K and V)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.kv_heads * self.head_dim * itemsize

    @property
    def layer_slot_bytes(self) -> int:
        return self.block_tokens * self.token_bytes

    @property
    def slot_bytes(self) -> int:
        """Bytes of one whole block: every layer, K and V."""
        return self.layers * self.layer_slot_bytes


class SlabPool:
    """Block slots in slabs; `bytes_used` is the bytes of the slabs actually allocated."""

    tier_name = "pool"

    def __init__(
        self,
        layout: SlotLayout,
        *,
        budget_bytes: int,
        slab_slots: int | None = None,
        max_slab_bytes: int = GiB,
    ) -> None:
        self.layout = layout
        self.budget_bytes = budget_bytes
        if slab_slots is None:
            # few slabs keep slot runs long (one copy each); a quarter of the budget, up to 1 GiB
            target = min(max_slab_bytes, max(budget_bytes // 4, layout.slot_bytes))
            slab_slots = max(1, target // layout.slot_bytes)
        self.slab_slots = slab_slots
        # device -> (positions of this pool's layers on it); layer -> (device, local index)
        self._devices = distinct_devices(layout.layer_devices)
        self._local: list[tuple[int, int]] = []
        for device in layout.layer_devices:
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
        return sum(self._slab_counts) * self.layout.slot_bytes

    @property
    def used_slots(self) -> int:
        return len(self._used)

    def capacity_slots(self, budget_bytes: int | None = None) -> int:
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        return budget // self.layout.slot_bytes

    def require(self, slots: int, what: str) -> None:
        """Raise BudgetError unless the budget can ever hold `slots` slots."""
        if self.capacity_slots() < slots:
            need = slots * self.layout.slot_bytes
            raise BudgetError(
                f"{self.tier_name} budget {self.budget_bytes} bytes cannot hold {what}: "
                f"need at least {need} bytes ({slots} blocks of {self.layout.slot_bytes} bytes)"
            )

    # -- slots ---------------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """Lowest free slot, growing a slab if the budget allows; None when full."""
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

    def layer_view(self, slot: int, layer: int) -> torch.Tensor:
        """`[block_tokens, 2, batch, kv_heads, head_dim]` view of one layer of one slot."""
        return self.run_view(slot, 1, layer)

    def run_view(self, slot: int, count: int, layer: int) -> torch.Tensor:
        """`[count * block_tokens, 2, batch, kv_heads, head_dim]` contiguous view of a slot run."""
        slab_index, first = divmod(slot, self.slab_slots)
        assert first + count <= self._slab_counts[slab_index], "run crosses a slab boundary"
        group, local = self._local[layer]
        view = self._slabs[slab_index][group][local, first : first + count]
        return view.reshape(count * self.layout.block_tokens, *self.layout.token_shape)

    @property
    def single_device(self) -> bool:
        return len(self._devices) == 1

    def slot_view(self, slot: int) -> torch.Tensor:
        """`[layers, block_tokens, 2, batch, kv_heads, head_dim]` of one slot (one device only)."""
        assert self.single_device
        index, offset = divmod(slot, self.slab_slots)
        return self._slabs[index][0][:, offset]

    def contiguous(self, a: int, b: int) -> bool:
        """True if slot b directly follows slot a inside one slab (one copy can move both)."""
        return b == a + 1 and a // self.slab_slots == b // self.slab_slots

    # -- budget changes ------------------------------------------------------------------------
    def set_budget(self, budget_bytes: int) -> list[int]:
        """Lower or raise the budget; returns occupied slots in slabs that no longer fit.

        The caller moves those blocks elsewhere, frees their slots, then calls `release()`.
        """
        self.budget_bytes = budget_bytes
        excess = self._excess_slabs()
        return [s for s in sorted(self._used) if s // self.slab_slots in excess]

    def release(self) -> None:
        """Free the trailing slabs over budget (they must be empty by now)."""
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
        """The highest slabs to drop so the rest fits the budget (slabs go from the top only)."""
        excess, total = set(), self.bytes_used
        for index in range(len(self._slabs) - 1, -1, -1):
            if total <= self.budget_bytes:
                break
            excess.add(index)
            total -= self._slab_counts[index] * self.layout.slot_bytes
        return excess

    def _grow(self) -> bool:
        if self._slabs and self._slab_counts[-1] < self.slab_slots:
            # a short last slab (cut by the budget) is replaced when empty; when in use, the next
            # slab starts at the next slab boundary and the short one keeps a gap of slot numbers
            last = len(self._slabs) - 1
            if not any(s // self.slab_slots == last for s in self._used):
                self._pop_slab()
        room = (self.budget_bytes - self.bytes_used) // self.layout.slot_bytes
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

    def _allocate_slab(self, device: torch.device, count: int) -> torch.Tensor:
        # [layers_on_device, count, block_tokens, 2, batch, kv_heads, head_dim]
        shape = (self._layers_on(device), count, self.layout.block_tokens, *self.layout.token_shape)
        return torch.empty(shape, dtype=self.layout.dtype, device=device)

    def _free_slab_tensor(self, tensor: torch.Tensor) -> None:
        """Hook for subclasses that must undo something (host unpinning)."""

    def _pop_slab(self) -> None:
        index = len(self._slabs) - 1
        for tensor in self._slabs.pop():
            self._free_slab_tensor(tensor)
        self._slab_counts.pop()
        self._free = [s for s in self._free if s // self.slab_slots != index]
        heapq.heapify(self._free)


def distinct_devices(devices: Sequence[torch.device]) -> list[torch.device]:
    out: list[torch.device] = []
    for d in devices:
        if d not in out:
            out.append(d)
    return out
