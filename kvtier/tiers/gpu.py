"""GPU tier: resident block slots (a SlabPool on the layers' devices) and the staging ring.

The staging ring holds `prefetch_depth + 1` position-ordered buffers per device
`[capacity, 2, batch, kv_heads, head_dim]`: layer j of a step is assembled in buffer
j % (depth + 1) and handed to attention as strided K and V views. On a CPU-only machine the
"GPU" is the model's device, the CPU.
"""

from __future__ import annotations

import torch

from .pool import SlabPool, SlotLayout, distinct_devices


class GpuPool(SlabPool):
    tier_name = "gpu"


class StagingRing:
    """Per-device assembly buffers; capacity grows in whole blocks and is counted in the budget."""

    def __init__(self, layout: SlotLayout, *, buffers: int) -> None:
        self.layout = layout
        self.buffers = buffers
        self.capacity_tokens = 0
        self._devices = distinct_devices(layout.layer_devices)
        self._ring: dict[torch.device, list[torch.Tensor]] = {}
        # ring position of each tiered layer: its rank among the layers on its device
        self._slot_of_layer: list[int] = []
        seen: dict[torch.device, int] = {}
        for device in layout.layer_devices:
            self._slot_of_layer.append(seen.get(device, 0) % buffers)
            seen[device] = seen.get(device, 0) + 1

    def bytes_for(self, tokens: int) -> int:
        capacity = -(-tokens // self.layout.block_tokens) * self.layout.block_tokens
        return len(self._devices) * self.buffers * capacity * self.layout.token_bytes

    @property
    def bytes_used(self) -> int:
        return self.bytes_for(self.capacity_tokens)

    def ensure(self, tokens: int) -> bool:
        """Grow every buffer to hold `tokens` positions; True if they were reallocated."""
        if tokens <= self.capacity_tokens:
            return False
        bt = self.layout.block_tokens
        self.capacity_tokens = -(-tokens // bt) * bt
        for device in self._devices:
            self._ring[device] = [
                torch.empty(
                    (self.capacity_tokens, *self.layout.token_shape),
                    dtype=self.layout.dtype,
                    device=device,
                )
                for _ in range(self.buffers)
            ]
        return True

    def buffer(self, layer: int) -> torch.Tensor:
        """The `[capacity, 2, batch, kv_heads, head_dim]` buffer tiered layer `layer` uses."""
        device = self.layout.layer_devices[layer]
        return self._ring[device][self._slot_of_layer[layer]]

    def close(self) -> None:
        self._ring.clear()
        self.capacity_tokens = 0
