"""Host tier: block slots in a few large slabs of (pinned, when CUDA is present) RAM.

Pinned slabs are plain CPU allocations registered with cudaHostRegister, not the caching host
allocator, which rounds each pinned tensor up to a power of two (vLLM issue 53042: 1.92x the
host memory asked for). So `bytes_used` is the real pinned bytes.
"""

from __future__ import annotations

import logging

import torch

from kvtier.blocks import Tier
from kvtier.layout import KVGeometry
from kvtier.tiers.pool import SlabPool

log = logging.getLogger(__name__)


class HostPool(SlabPool):
    tier = Tier.HOST

    def __init__(self, geometry: KVGeometry, *, limit_bytes: int, pin: bool | None = None) -> None:
        super().__init__(geometry.on_host(), limit_bytes=limit_bytes)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.pinned_bytes = 0

    def stats(self) -> dict[str, object]:
        return {"pinned_bytes": self.pinned_bytes}

    def _allocate_slab(self, device: torch.device, count: int) -> torch.Tensor:
        slab = super()._allocate_slab(device, count)
        if self.pin:
            nbytes = slab.numel() * slab.element_size()
            err = torch.cuda.cudart().cudaHostRegister(slab.data_ptr(), nbytes, 0)
            if int(err) != 0:
                log.warning("cudaHostRegister failed (%s); host slab stays pageable", err)
            else:
                self.pinned_bytes += nbytes
        return slab

    def _free_slab_tensor(self, tensor: torch.Tensor) -> None:
        if self.pin and self.pinned_bytes:
            nbytes = tensor.numel() * tensor.element_size()
            if int(torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())) == 0:
                self.pinned_bytes -= nbytes
