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

What is registered anew is made cheap to register: a slab is its own anonymous mapping advised
to transparent huge pages, and the pinning thread faults its pages in (MADV_POPULATE_WRITE,
which keeps whatever the tier already wrote) before cudaHostRegister, which then has little left
to do while it holds the driver. Measured on the H200 per GiB (scripts/probe_pinning.py):
register alone 0.48-0.77 s; pages touched first 0.05-0.11 s + 0.06-0.12 s; huge pages touched
first 0.04-0.07 s + 0.03-0.06 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import mmap
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


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable, contents unchanged
_libc: ctypes.CDLL | None = None


def host_buffer(nbytes: int) -> torch.Tensor:
    """A flat uint8 CPU buffer of its own anonymous mapping, advised to huge pages (fewer pages
    to pin); the tensor keeps the mapping alive and unmapping returns the RAM at once."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP: plain pages
        region.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(region, dtype=torch.uint8)


def populate(buffer: torch.Tensor) -> bool:
    """Fault a buffer's pages in without changing them (so registering it is cheap); False
    where the kernel cannot (cudaHostRegister then faults them itself)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(buffer.data_ptr(), buffer.nbytes, _MADV_POPULATE_WRITE) == 0


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
        # slab data_ptr -> its flat uint8 buffer and that buffer's registration
        self._pinning: dict[int, tuple[torch.Tensor, Future]] = {}

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the slabs whose registration has finished."""
        with self._lock:
            return self._pinned_bytes

    def finish_pinning(self) -> None:
        """Wait until every slab allocated so far is registered (tests, benchmarks)."""
        for _, future in list(self._pinning.values()):
            future.result()

    def stats(self) -> dict[str, object]:
        return {"pinned_bytes": self.pinned_bytes}

    def _allocate_slab(self, device: torch.device, count: int) -> torch.Tensor:
        if not self.pin:
            return super()._allocate_slab(device, count)
        shape = self._slab_shape(device, count)
        nbytes = self.geometry.dtype.itemsize * math.prod(shape)
        buffer = KEPT.take(nbytes) if self.keep_pinned else None
        done: Future = Future()
        if buffer is not None:  # registered by an earlier pool
            done.set_result(True)
            with self._lock:
                self._pinned_bytes += nbytes
        else:
            buffer = host_buffer(nbytes)
            if self._pinner is None:
                self._pinner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-pin")
            done = self._pinner.submit(self._register, buffer)
        self._pinning[buffer.data_ptr()] = (buffer, done)
        return buffer.view(self.geometry.dtype).view(shape)

    def _register(self, buffer: torch.Tensor) -> bool:
        populate(buffer)
        if not register(buffer):
            return False
        with self._lock:
            self._pinned_bytes += buffer.nbytes
        return True

    def _free_slab_tensor(self, tensor: torch.Tensor) -> None:
        buffer, future = self._pinning.pop(tensor.data_ptr(), (None, None))
        if future is None or not future.result():
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
