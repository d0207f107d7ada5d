"""Host tier: block slots in a few large slabs of (pinned, when CUDA is present) RAM.

Slabs are plain CPU allocations registered with cudaHostRegister, not the caching host
allocator, which rounds each pinned tensor up to a power of two (vLLM issue 53042: 1.92x the
host memory asked for). Registering runs in a background thread, in slab order: it took
~0.6 s per GiB on the lent GPU host, which a prefill must not wait for (DESIGN.md 8); a slab
is usable at once and copies to it run at pinned speed once its registration is done.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

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
        self._pinned_bytes = 0
        self._lock = threading.Lock()
        self._pinner: ThreadPoolExecutor | None = None
        self._pinning: dict[int, Future] = {}  # slab data_ptr -> its registration

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the slabs whose registration has finished."""
        with self._lock:
            return self._pinned_bytes

    def finish_pinning(self) -> None:
        """Wait until every slab allocated so far is registered (tests, benchmarks)."""
        for future in list(self._pinning.values()):
            future.result()

    def stats(self) -> dict[str, object]:
        return {"pinned_bytes": self.pinned_bytes}

    def _allocate_slab(self, device: torch.device, count: int) -> torch.Tensor:
        slab = super()._allocate_slab(device, count)
        if self.pin:
            if self._pinner is None:
                self._pinner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-pin")
            self._pinning[slab.data_ptr()] = self._pinner.submit(self._register, slab)
        return slab

    def _register(self, slab: torch.Tensor) -> bool:
        nbytes = slab.numel() * slab.element_size()
        err = torch.cuda.cudart().cudaHostRegister(slab.data_ptr(), nbytes, 0)
        if int(err) != 0:
            log.warning("cudaHostRegister failed (%s); a host slab stays pageable", err)
            return False
        with self._lock:
            self._pinned_bytes += nbytes
        return True

    def _free_slab_tensor(self, tensor: torch.Tensor) -> None:
        future = self._pinning.pop(tensor.data_ptr(), None)
        if future is None or not future.result():
            return
        nbytes = tensor.numel() * tensor.element_size()
        if int(torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())) == 0:
            with self._lock:
                self._pinned_bytes -= nbytes

    def close(self) -> None:
        super().close()
        if self._pinner is not None:
            self._pinner.shutdown(wait=True)
            self._pinner = None
