"""GPU tier: resident block slots (a SlabPool on the layers' devices) and the staging ring.

The staging ring holds `buffers` (prefetch_depth + 1) position-ordered buffers per device
`[capacity, 2, batch, kv_heads, head_dim]`: layer j of a step is assembled in buffer
j % buffers and handed to attention as strided K and V views. On a CPU-only machine the
"GPU" is the model's device, the CPU.
"""

from __future__ import annotations

import torch

from kvtier.blocks import Tier
from kvtier.layout import KVGeometry, staging_bytes, staging_tokens
from kvtier.tiers.pool import SlabPool


class GpuPool(SlabPool):
    tier = Tier.GPU


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

    def ensure(self, tokens: int) -> bool:
        """Grow every buffer to hold `tokens` positions; True if they were reallocated."""
        if tokens <= self.capacity_tokens:
            return False
        g = self.geometry
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


def write_tokens(stage: torch.Tensor, start: int, keys: torch.Tensor, values: torch.Tensor):
    """Write new K and V `[batch, kv_heads, q, head_dim]` into a staging buffer at `start`.

    Returns the new positions token-major `[q, 2, batch, kv_heads, head_dim]` (a view of the
    inputs, to copy into block slots) and the buffer's K and V `[batch, kv_heads, start + q,
    head_dim]` as strided views: what attention reads.
    """
    end = start + keys.shape[-2]
    new_kv = torch.stack((keys, values)).permute(3, 0, 1, 2, 4)
    stage[start:end].copy_(new_kv)
    _, batch, heads, dim = stage.shape[1:]
    size, stride = (batch, heads, end, dim), (heads * dim, dim, 2 * batch * heads * dim, 1)
    offset = stage.storage_offset()
    k_view = torch.as_strided(stage, size, stride, offset)
    v_view = torch.as_strided(stage, size, stride, offset + batch * heads * dim)
    return new_kv, k_view, v_view
