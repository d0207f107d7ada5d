"""GPU tier: resident block slots (GpuPool) and the staging ring.

GpuPool keeps, per tiered layer, one slot-ordered tensor on that layer's device, grown by
reallocation within the limit; while block i sits in slot i, a layer's whole context is one
token-major range attention reads in place. The staging ring holds `buffers` (prefetch_depth
+ 1) position-ordered buffers per device `[capacity, 2, batch, kv_heads, head_dim]` where a
streamed layer is assembled. On a CPU-only machine the "GPU" is the model's device, the CPU.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import torch

from kvtier.blocks import BlockMeta, Tier
from kvtier.layout import KVGeometry, device_staging_bytes, staging_bytes, staging_tokens

# how much a full pool grows at once (a quarter more), so growth copies stay amortized O(1)
GROWTH = 1.25


class GpuPool:
    """GPU slots of one sequence: per tiered layer `[capacity, block_tokens, 2, batch, kv_heads,
    head_dim]`, slot-ordered. Implements the TierStore protocol (tiers/base.py) for memory.

    Allocation takes the lowest free slot and grows the tensors (copying) when none is free and
    the limit allows; the replaced tensors go to `retire` (the mover keeps them alive until
    the copies still reading them on side streams are done).
    """

    tier = Tier.GPU
    holds_open_blocks = True

    def __init__(
        self,
        geometry: KVGeometry,
        *,
        limit_bytes: int,
        retire: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> None:
        self.geometry = geometry
        self.limit_bytes = limit_bytes
        self.slot_bytes = geometry.block_bytes
        self.capacity_slots = 0
        self._retire = retire or (lambda tensors: None)
        self._layers: list[torch.Tensor] = []
        self._free: list[int] = []  # heap of free slots below capacity
        self._used: set[int] = set()

    # -- accounting ----------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return self.capacity_slots * self.slot_bytes

    @property
    def used_slots(self) -> int:
        return len(self._used)

    def capacity_blocks(self, limit_bytes: int | None = None) -> int:
        limit = self.limit_bytes if limit_bytes is None else limit_bytes
        return limit // self.slot_bytes

    def room_blocks(self) -> int:
        return self.capacity_blocks() - self.used_slots

    def bytes_on(self, device: torch.device) -> int:
        """Bytes of the slot tensors on `device` (its layers' share of every slot)."""
        return self.capacity_slots * self.geometry.device_block_bytes(device)

    def stats(self) -> dict[str, object]:
        return {"slot_bytes": self.bytes_used}

    # -- slots ---------------------------------------------------------------------------------
    def allocate(self, block: BlockMeta | None = None) -> int | None:
        """Lowest free slot, growing the tensors if the limit allows; None when full."""
        if not self._free:
            wanted = max(self.capacity_slots + 1, math.ceil(self.capacity_slots * GROWTH))
            if not self.reserve(wanted):
                return None
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def reserve_ahead(self, blocks: int) -> bool:
        """Reserve room for a prompt of `blocks` blocks and GROWTH more (within the limit), so
        the tokens generated after it do not grow the tensors: a growth holds the old and the
        new ones at once, the whole KV twice for a moment (seen on the H200 as a peak of twice
        the KV when decode crossed into one more block)."""
        return self.reserve(math.ceil(blocks * GROWTH))

    def reserve(self, slots: int) -> bool:
        """Grow the capacity to `slots` (within the limit) ahead of need; True if it grew."""
        slots = min(slots, self.capacity_blocks())
        if slots <= self.capacity_slots:
            return False
        self._resize(slots)
        return True

    def free(self, slot: int) -> None:
        self._used.discard(slot)
        heapq.heappush(self._free, slot)

    def contiguous(self, first: int, second: int) -> bool:
        return second == first + 1

    # -- views ---------------------------------------------------------------------------------
    def source(self, slot: int, tiered_index: int, count: int = 1) -> torch.Tensor:
        """`[count * block_tokens, 2, batch, kv_heads, head_dim]` contiguous view of a slot run."""
        assert slot + count <= self.capacity_slots, "run beyond the pool"
        view = self._layers[tiered_index][slot : slot + count]
        return view.view(count * self.geometry.block_tokens, *self.geometry.token_shape)

    def run_start(self, slot: int, tiered_index: int, count: int) -> tuple[torch.Tensor, int]:
        """The layer's slot tensor and the storage offset of a `count`-slot run from `slot`:
        what `write_tokens` reads a run in place through, without making a view first."""
        assert slot + count <= self.capacity_slots, "run beyond the pool"
        tensor = self._layers[tiered_index]
        return tensor, tensor.storage_offset() + slot * tensor.stride(0)

    def block_source(self, slot: int) -> tuple[torch.Tensor, ...]:
        return tuple(self.source(slot, i) for i in range(self.geometry.tiered_layers))

    def block_target(self, slot: int, *, parent_id: str | None = None) -> tuple[torch.Tensor, ...]:
        return self.block_source(slot)

    def reorder_rows(self, slot: int, rows: torch.Tensor, **keys: object) -> int:
        """Permute the batch rows of every layer of one slot in place (beam search)."""
        for view in self.block_source(slot):  # [block_tokens, 2, batch, kv_heads, head_dim]
            view.copy_(view.index_select(2, rows.to(view.device)))
        return slot

    # -- limit changes -------------------------------------------------------------------------
    def set_limit(self, limit_bytes: int) -> list[int]:
        """Lower or raise the limit; returns occupied slots that no longer fit. The caller moves
        those blocks elsewhere, frees their slots, then calls `release()`."""
        self.limit_bytes = limit_bytes
        keep = self.capacity_blocks()
        return sorted(s for s in self._used if s >= keep)

    def release(self) -> None:
        """Shrink the tensors to the limit (the slots above it must be free by now)."""
        keep = self.capacity_blocks()
        if self.capacity_slots > keep:
            assert not any(s >= keep for s in self._used)
            self._resize(keep)

    def close(self) -> None:
        self._retire(self._layers)
        self._layers = []
        self.capacity_slots = 0
        self._free.clear()
        self._used.clear()

    def _resize(self, slots: int) -> None:
        g = self.geometry
        old, kept = self._layers, min(slots, self.capacity_slots)
        self._layers = []
        for index, device in enumerate(g.layer_devices):
            # [slots, block_tokens, 2, batch, kv_heads, head_dim]
            shape = (slots, g.block_tokens, *g.token_shape)
            tensor = torch.empty(shape, dtype=g.dtype, device=device)
            if kept:
                tensor[:kept].copy_(old[index][:kept])
            self._layers.append(tensor)
        self._retire(old)
        self._free = [s for s in self._free if s < slots]
        self._free.extend(range(self.capacity_slots, slots))
        heapq.heapify(self._free)
        self.capacity_slots = slots


class StagingRing:
    """Per-device assembly buffers; capacity grows in whole blocks and is counted in the budget."""

    def __init__(self, geometry: KVGeometry, *, buffers: int) -> None:
        self.geometry = geometry
        self.buffers = buffers
        self.capacity_tokens = 0
        self._ring: dict[torch.device, list[torch.Tensor]] = {}
        # ring position of each tiered layer: its rank among the layers on its device
        self._slot_of_layer: list[int] = []
        seen: dict[torch.device, int] = {}
        for device in geometry.layer_devices:
            self._slot_of_layer.append(seen.get(device, 0) % buffers)
            seen[device] = seen.get(device, 0) + 1

    def bytes_for(self, tokens: int) -> int:
        return staging_bytes(self.geometry, tokens, buffers=self.buffers)

    @property
    def bytes_used(self) -> int:
        return self.bytes_for(self.capacity_tokens)

    def bytes_on(self, device: torch.device) -> int:
        """Bytes of the buffers on `device` (the same on every device with a tiered layer)."""
        if device not in self.geometry.devices:
            return 0
        return device_staging_bytes(self.geometry, self.capacity_tokens, buffers=self.buffers)

    def ensure(self, tokens: int) -> bool:
        """Grow every buffer to hold `tokens` positions; True if they were reallocated."""
        if tokens <= self.capacity_tokens:
            return False
        return self.resize(tokens)

    def resize(self, tokens: int) -> bool:
        """Reallocate every buffer for exactly `tokens` positions (whole blocks; may shrink);
        True if they changed. What they held is gone: the next gathers fill them again."""
        g = self.geometry
        if staging_tokens(g, tokens) == self.capacity_tokens:
            return False
        self.capacity_tokens = staging_tokens(g, tokens)
        for device in g.devices:
            self._ring[device] = [
                torch.empty((self.capacity_tokens, *g.token_shape), dtype=g.dtype, device=device)
                for _ in range(self.buffers)
            ]
        return True

    def buffer(self, tiered_index: int) -> torch.Tensor:
        """The `[capacity, 2, batch, kv_heads, head_dim]` buffer tiered layer `tiered_index` uses."""
        device = self.geometry.layer_devices[tiered_index]
        return self._ring[device][self._slot_of_layer[tiered_index]]

    def close(self) -> None:
        self._ring.clear()
        self.capacity_tokens = 0


def write_tokens(
    stage: torch.Tensor,
    start: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    offset: int | None = None,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new K and V `[batch, kv_heads, q, head_dim]` at position `start` of a token-major
    buffer `[tokens, 2, batch, kv_heads, head_dim]` that starts `offset` elements into `stage`'s
    storage (its own offset by default); returns its K and V `[batch, kv_heads, start + q,
    head_dim]` as strided views: what attention reads.

    `positions` (`arange(start, start + q)` on the buffer's device, made once per step) writes
    each of K and V with one indexed copy: the fewest host calls a decode layer can make.
    """
    end = start + keys.shape[-2]
    _, batch, heads, dim = stage.shape[-4:]
    size, stride = (batch, heads, end, dim), (heads * dim, dim, 2 * batch * heads * dim, 1)
    offset = stage.storage_offset() if offset is None else offset
    k_view = torch.as_strided(stage, size, stride, offset)
    v_view = torch.as_strided(stage, size, stride, offset + batch * heads * dim)
    if positions is None:
        k_view[:, :, start:end].copy_(keys)
        v_view[:, :, start:end].copy_(values)
    else:
        k_view.index_copy_(2, positions, keys)
        v_view.index_copy_(2, positions, values)
    return k_view, v_view
