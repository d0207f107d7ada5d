"""Host tier: block slots in a few large slabs of (pinned, when CUDA is present) RAM.

Slabs are plain CPU allocations registered with cudaHostRegister, not the caching host
allocator, which rounds each pinned tensor up to a power of two (vLLM issue 53042: 1.92x the
host memory asked for). Registering runs in a background thread, in slab order: it took
~0.6 s per GiB on the lent GPU host, which a prefill must not wait for (DESIGN.md 8); a slab
is usable at once and copies to it run at pinned speed once its registration is done.

Registering also stalls the process's other CUDA calls while it runs (measured on the lent H200:
cudaHostRegister 0.43 s per GiB, and the prefill's launches and memsets waiting behind it: a
32K streaming prefill took 3.3 s instead of 1.8 s), so a closed pool's registered slabs are kept
(`keep_pinned`, the default, as PyTorch's pinned allocator keeps its blocks) and the next pool
of the process with slabs of the same size takes them without registering anything.
`release_pinned_memory()` frees what is kept; a pool that needs another size frees it first.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import psutil
import torch

from kvtier.blocks import Tier
from kvtier.layout import KVGeometry
from kvtier.tiers.pool import SlabPool

log = logging.getLogger(__name__)

# kept slabs never leave less than this share of the machine's RAM available
_KEEP_AVAILABLE_SHARE = 0.1


def register(buffer: torch.Tensor) -> bool:
    """Pin a CPU tensor's memory in place (cudaHostRegister); False, with a warning, if refused."""
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0)
    if int(err) != 0:
        log.warning("cudaHostRegister failed (%s); a host slab stays pageable", err)
        return False
    return True


def unregister(buffer: torch.Tensor) -> bool:
    return int(torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())) == 0


class KeptSlabs:
    """Registered slab buffers (flat uint8) that closed pools left for the next pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[int, list[torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(n * len(buffers) for n, buffers in self._free.items())

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A kept buffer of exactly `nbytes`, or None (then every kept buffer of another size is
        freed first: the new pool's slabs take their place in RAM)."""
        with self._lock:
            buffers = self._free.get(nbytes)
            if buffers:
                return buffers.pop()
            others = [b for n, group in self._free.items() if n != nbytes for b in group]
            self._free = {n: group for n, group in self._free.items() if n == nbytes}
        for buffer in others:
            unregister(buffer)
        return None

    def give(self, buffer: torch.Tensor) -> bool:
        """Keep a registered buffer; False (the caller frees it) when RAM runs short."""
        memory = psutil.virtual_memory()
        if memory.available < _KEEP_AVAILABLE_SHARE * memory.total:
            return False
        with self._lock:
            self._free.setdefault(buffer.nbytes, []).append(buffer)
        return True

    def release(self) -> int:
        """Unregister and drop every kept buffer; the bytes freed."""
        with self._lock:
            buffers = [b for group in self._free.values() for b in group]
            self._free = {}
        for buffer in buffers:
            unregister(buffer)
        return sum(b.nbytes for b in buffers)


KEPT = KeptSlabs()


def release_pinned_memory() -> int:
    """Free the pinned host slabs closed caches kept for the next cache of this process; the
    bytes freed. Open caches keep theirs."""
    return KEPT.release()


class HostPool(SlabPool):
    tier = Tier.HOST

    def __init__(
        self,
        geometry: KVGeometry,
        *,
        limit_bytes: int,
        pin: bool | None = None,
        keep_pinned: bool = True,
    ) -> None:
        super().__init__(geometry.on_host(), limit_bytes=limit_bytes)
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.keep_pinned = keep_pinned
        self._pinned_bytes = 0
        self._lock = threading.Lock()
        self._pinner: ThreadPoolExecutor | None = None
        self._pinning: dict[int, Future] = {}  # slab data_ptr -> its registration
        self._buffers: dict[int, torch.Tensor] = {}  # slab data_ptr -> its flat uint8 buffer

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
        if not self.pin:
            return super()._allocate_slab(device, count)
        g = self.geometry
        shape = (self._layers_on(device), count, g.block_tokens, *g.token_shape)
        nbytes = g.dtype.itemsize * math.prod(shape)
        buffer = KEPT.take(nbytes) if self.keep_pinned else None
        done: Future = Future()
        if buffer is not None:  # registered by an earlier pool
            done.set_result(True)
            with self._lock:
                self._pinned_bytes += nbytes
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            if self._pinner is None:
                self._pinner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-pin")
            done = self._pinner.submit(self._register, buffer)
        self._pinning[buffer.data_ptr()] = done
        self._buffers[buffer.data_ptr()] = buffer
        return buffer.view(g.dtype).view(shape)

    def _register(self, buffer: torch.Tensor) -> bool:
        if not register(buffer):
            return False
        with self._lock:
            self._pinned_bytes += buffer.nbytes
        return True

    def _free_slab_tensor(self, tensor: torch.Tensor) -> None:
        future = self._pinning.pop(tensor.data_ptr(), None)
        buffer = self._buffers.pop(tensor.data_ptr(), None)
        if future is None or buffer is None or not future.result():
            return
        with self._lock:
            self._pinned_bytes -= buffer.nbytes
        if not (self.keep_pinned and KEPT.give(buffer)):
            unregister(buffer)

    def close(self) -> None:
        super().close()
        if self._pinner is not None:
            self._pinner.shutdown(wait=True)
            self._pinner = None
