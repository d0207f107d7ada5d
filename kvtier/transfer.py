"""Mover: every copy between tiers, and the only module that touches CUDA streams and events.

Copies into the staging ring go on a per-device copy stream after the compute stream's current
point; write-through to host goes on a D2H stream; disk reads and writes run in one bounded
thread pool. The compute stream waits on events, never on a device-wide synchronize. Without
CUDA the same calls copy synchronously. The mover moves; it never decides what to move.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

Copy = tuple[torch.Tensor, torch.Tensor]  # (source, destination), equal shapes
# a disk read: fills the given CPU tensor, returns False if the block could not be read
DiskRead = tuple[Callable[[torch.Tensor], bool], torch.Tensor]


@dataclass
class Ticket:
    """Completion handle of one submitted group of copies (and disk reads feeding them)."""

    device: torch.device
    event: torch.cuda.Event | None = None
    reads: list[tuple[Future, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    # device-to-device copies run on the compute stream when it waits (SM copy kernels)
    local: list[Copy] = field(default_factory=list)

    def done(self) -> bool:
        return (self.event is None or self.event.query()) and all(f.done() for f, *_ in self.reads)


class Mover:
    """Moves bytes: staging gathers, write-through, promotions, and disk I/O in a thread pool."""

    # where GPU-resident blocks are copied into staging: the copy stream (default) or the compute
    # stream. Measured on the lent H100, Llama-3-8B shape, all KV resident (docs/benchmarks.md):
    # copy stream 39.4 ms/step at 32K vs 45.1 on the compute stream
    d2d_on_compute = False

    def __init__(self, *, workers: int = 4) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvtier-io")
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._d2h_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.copies = 0
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.d2d_bytes = 0
        self.wait_s = 0.0
        self._d2h_dirty: dict[torch.device, bool] = {}
        # buffers whose stream use is recorded, held weakly so a dropped buffer is freed
        self._recorded: weakref.WeakValueDictionary[int, torch.Tensor] = (
            weakref.WeakValueDictionary()
        )

    # -- staging -------------------------------------------------------------------------------
    def gather(
        self,
        device: torch.device,
        copies: Sequence[Copy],
        reads: Sequence[DiskRead] = (),
        *,
        target: torch.Tensor | None = None,
    ) -> Ticket:
        """Start filling staging: `copies` from GPU/host slots, `reads` from disk.

        Returns at once on CUDA (copies queued on the copy stream behind the compute stream's
        current work, so a buffer that attention is still reading is not overwritten). Disk reads
        start in the thread pool; on CUDA they land in pinned bounce buffers and go up in `wait`.
        `target` is the buffer all destinations are views of (marked in use by the stream once).
        """
        ticket = Ticket(device)
        for read, dst in reads:
            if device.type == "cuda":
                bounce = torch.empty(dst.shape, dtype=dst.dtype, pin_memory=True)
                ticket.reads.append((self.pool.submit(read, bounce), bounce, dst))
            else:
                ticket.reads.append((self.pool.submit(read, dst), dst, None))
        if device.type != "cuda":
            for src, dst in copies:
                dst.copy_(src)
            self._count_all(copies)
            return ticket
        if self.d2d_on_compute:
            ticket.local = [(s, d) for s, d in copies if s.is_cuda]
            copies = [(s, d) for s, d in copies if not s.is_cuda]
        stream = self._stream(self._copy_streams, device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # staging buffers are also read by D2H writes of fresh tokens: do not overwrite them early
        if self._d2h_dirty.pop(device, False):
            stream.wait_stream(self._d2h_streams[device])
        if target is not None and id(target) not in self._recorded:
            # once per buffer: its memory is not reused while this stream may still write it
            target.record_stream(stream)
            self._recorded[id(target)] = target
        with torch.cuda.stream(stream):
            for src, dst in copies:
                dst.copy_(src, non_blocking=True)
            ticket.event = torch.cuda.Event()
            ticket.event.record(stream)
        self._count_all(copies)
        self._count_all(ticket.local)
        return ticket

    def wait(self, ticket: Ticket) -> bool:
        """Make the compute stream wait for the ticket; False if a disk read failed.

        Blocks the host only on disk reads still running; GPU copies are waited on by event.
        """
        start = time.perf_counter()
        ok = True
        pending_up: list[Copy] = []
        for future, landed, dst in ticket.reads:
            ok = future.result() and ok
            if dst is not None:
                pending_up.append((landed, dst))
        device = ticket.device
        if device.type == "cuda":
            compute = torch.cuda.current_stream(device)
            if ticket.event is not None:
                compute.wait_event(ticket.event)
            for src, dst in pending_up:
                dst.copy_(src, non_blocking=True)
                self._count(src, dst)
            for src, dst in ticket.local:
                dst.copy_(src)
        self.wait_s += time.perf_counter() - start
        return ok

    # -- write-through and promotions ----------------------------------------------------------
    def write_through(self, device: torch.device, copies: Sequence[Copy]) -> Ticket:
        """Copy freshly sealed GPU blocks to host slots on the D2H stream."""
        ticket = Ticket(device)
        if device.type != "cuda":
            for src, dst in copies:
                dst.copy_(src)
                self._count(src, dst)
            return ticket
        stream = self._stream(self._d2h_streams, device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for src, dst in copies:
                dst.copy_(src, non_blocking=True)
                src.record_stream(stream)
                self._count(src, dst)
            ticket.event = torch.cuda.Event()
            ticket.event.record(stream)
        self._d2h_dirty[device] = True
        return ticket

    def copy_now(self, copies: Sequence[Copy]) -> None:
        """Copy in the compute stream's order (promotions, reorders): rare, off the decode path."""
        for src, dst in copies:
            dst.copy_(src, non_blocking=dst.is_cuda and not src.is_cuda)
            self._count(src, dst)

    def finish(self, ticket: Ticket) -> None:
        """Block the host until the ticket's copies are done (before freeing their source)."""
        if ticket.event is not None:
            start = time.perf_counter()
            ticket.event.synchronize()
            self.wait_s += time.perf_counter() - start
        for future, *_ in ticket.reads:
            future.result()

    # -- disk ----------------------------------------------------------------------------------
    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        """Run disk I/O in the mover's thread pool."""
        return self.pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def stats(self) -> dict:
        return {
            "copies": self.copies,
            "h2d_bytes": self.h2d_bytes,
            "d2h_bytes": self.d2h_bytes,
            "d2d_bytes": self.d2d_bytes,
            "wait_ms": round(self.wait_s * 1e3, 3),
        }

    # -- internals -----------------------------------------------------------------------------
    @staticmethod
    def _stream(streams: dict, device: torch.device) -> torch.cuda.Stream:
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)
        return streams[device]

    def _count_all(self, copies: Sequence[Copy]) -> None:
        for src, dst in copies:
            self._count(src, dst)

    def _count(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        nbytes = src.numel() * src.element_size()
        self.copies += 1
        if src.device.type == dst.device.type:
            self.d2d_bytes += nbytes
        elif dst.device.type == "cpu":
            self.d2h_bytes += nbytes
        else:
            self.h2d_bytes += nbytes
