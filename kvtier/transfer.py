"""Mover: every copy between tiers, and the only module that touches CUDA streams and events.

One pair of verbs: `submit(copies, lane=...) -> Ticket`, then `wait(ticket)` (the compute stream
waits, the host only on I/O) or `finish(ticket)` (the host waits, before a source is freed). A
copy is (source, destination); each side is a tensor view, a block's per-layer views, or a
`Stored` block in a serialized store, whose `load_into` / `save` run in the one I/O thread pool.
`submit_reads` reads whole stored blocks into host memory, all in flight at once (prefix reuse).
Without CUDA the same calls copy synchronously. The mover moves; it never decides what to move.
"""

from __future__ import annotations

import enum
import logging
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtier.copies import Sorted, coalesce, sort_copies
from kvtier.errors import KVTierError, NotStored
from kvtier.machine import default_io_threads
from kvtier.save_queue import SaveQueue
from kvtier.tiers.base import Endpoint, SerializedStore, Stored

log = logging.getLogger(__name__)

Copy = tuple[Endpoint, Endpoint]  # (source, destination), equal shapes
# Blocks per save_blocks call (submit_saves): one pipeline, one round trip, for many blocks;
# calls of this size still spread a prefill's blocks over several I/O threads, and bound the
# host buffers that relayed blocks are read into, and how long a wait for one block can take.
SAVE_BATCH_BYTES = 32 << 20


class Lane(enum.Enum):
    """Where a submission's tensor copies run."""

    PREFETCH = "prefetch"  # copy stream, after the compute stream's current work (staging)
    WRITE_BACK = "write_back"  # D2H stream: write-through of GPU data to host slots
    NOW = "now"  # in compute-stream order: promotions, demotions, slot writes


@dataclass
class Ticket:
    """Completion handle of one submission."""

    events: list[torch.cuda.Event] = field(default_factory=list)  # one per CUDA device used
    # loads: (future -> ReadResult or bool, the CPU tensor it fills, where that goes on the GPU
    # or None); `sources` holds each load's Stored block, in the same order
    loads: list[tuple[Future, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)
    sources: list[Stored] = field(default_factory=list)
    saves: list[Future] = field(default_factory=list)  # future -> bytes written
    reads: list[Future] = field(default_factory=list)  # whole-block reads -> ReadResult, in order
    uploaded: bool = False

    @property
    def background(self) -> bool:
        """True when it saves to a serialized store: settle it later with `done` / `finish`."""
        return bool(self.saves)

    def failures(self) -> list[tuple[Stored, object]]:
        """The loads that found their block missing or corrupt, with what the store said (a
        ReadResult: MISSING or CORRUPT), once they are done (after `wait` / `finish`)."""
        out = []
        for (future, *_), source in zip(self.loads, self.sources, strict=True):
            if future.done() and not future.result():
                out.append((source, future.result()))
        return out

    def read_results(self) -> list[object]:
        """What the store said of each `submit_reads` block, in order (a ReadResult: falsy when
        missing or corrupt), once the ticket is finished."""
        return [future.result() for future in self.reads]

    def done(self) -> bool:
        return (
            all(event.query() for event in self.events)
            and all(f.done() for f, *_ in self.loads)
            and all(f.done() for f in self.saves)
            and all(f.done() for f in self.reads)
        )


class Mover:
    """Moves bytes: staging gathers, write-through, promotions, and serialized-store I/O."""

    # a gather's copies of GPU-resident blocks run on a second copy stream (False: in series
    # with its host-to-GPU copies, the A/B switch of scripts/bench_decode.py)
    SPLIT_DEVICE_COPIES = True

    def __init__(self, *, workers: int | None = None) -> None:
        workers = workers or default_io_threads()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvtier-io")
        self._saves = SaveQueue(self.pool, _save_batch)  # save_blocks batches, per store
        self._streams: dict[tuple[Lane, torch.device], torch.cuda.Stream] = {}
        self.copies = 0
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.d2d_bytes = 0
        self.wait_s = 0.0
        self._d2h_dirty: set[torch.device] = set()
        # buffers whose stream use is recorded, held weakly so a dropped buffer is freed
        self._recorded: weakref.WeakValueDictionary[tuple[int, int], torch.Tensor] = (
            weakref.WeakValueDictionary()
        )

    # -- the two verbs -------------------------------------------------------------------------
    def submit(
        self,
        copies: Sequence[Copy] | Sorted,
        *,
        lane: Lane,
        target: torch.Tensor | None = None,
    ) -> Ticket:
        """Start `copies` (or tensor copies sorted once by `sort_copies`, reused every step);
        returns at once on CUDA.

        PREFETCH copies queue on each device's copy stream behind its compute stream's current
        work, so a buffer attention still reads is not overwritten; `target` is the buffer they
        write (marked in use by that stream once). WRITE_BACK copies go on the D2H stream; NOW
        copies in compute-stream order, those that continue one another merged. Loads from a
        serialized store run in the I/O pool (on CUDA into pinned bounce buffers, uploaded in
        `wait`); saves run there too.
        """
        ticket = Ticket()
        if isinstance(copies, Sorted):
            self._launch(ticket, copies, lane, target)
            return ticket
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for source, destination in copies:
            for src, dst in _per_layer(source, destination):
                if isinstance(dst, Stored) and isinstance(src, Stored):
                    ticket.saves.append(self.pool.submit(_relay, src, dst))
                elif isinstance(dst, Stored):
                    ticket.saves.append(self.pool.submit(_save, dst, src))
                elif isinstance(src, Stored):
                    self._load(ticket, src, dst, now=lane is Lane.NOW)
                else:
                    pairs.append((src, dst))
        if lane is Lane.NOW and len(pairs) > 1:  # whole blocks slot by slot: runs are one copy
            pairs = coalesce(pairs)
        self._launch(ticket, sort_copies(pairs), lane, target)
        if lane is Lane.NOW:
            self._upload(ticket)
        return ticket

    def _launch(
        self, ticket: Ticket, copies: Sorted, lane: Lane, target: torch.Tensor | None
    ) -> None:
        self._count(copies)
        for device, pairs in copies.by_device.items():
            if device is None:  # CPU only: synchronous
                for src, dst in pairs:
                    dst.copy_(src)
            elif lane is Lane.NOW:
                for src, dst in pairs:
                    dst.copy_(src, non_blocking=dst.is_cuda and not src.is_cuda)
            else:
                groups = [pairs]
                if lane is Lane.PREFETCH and self.SPLIT_DEVICE_COPIES:
                    split = [copies.off_device.get(device), copies.on_device.get(device)]
                    groups = split if all(split) else groups
                ticket.events.extend(self._on_streams(lane, device, groups, target))

    def submit_reads(self, reads: Sequence[tuple[Stored, tuple[torch.Tensor, ...]]]) -> Ticket:
        """Read whole stored blocks (`Stored` with no `tiered_index`) into CPU tensors, one per
        tiered layer (contiguous; pinned is fine), with `load_block`: one file open or GET per
        block, every read queued in the I/O pool at once (as many in flight as it has threads),
        where the decode and the checksums of one overlap the I/O of the next. Returns at once;
        `finish` waits (False if any block failed), then `ticket.read_results()`. Whatever the
        tensors go on to (a GPU slot) is the caller's copy, after `finish`."""
        ticket = Ticket()
        for source, layers in reads:
            assert source.tiered_index is None, "submit_reads reads whole blocks"
            ticket.reads.append(self.pool.submit(source.store.load_block, source.key, layers))
        return ticket

    def wait(self, ticket: Ticket) -> bool:
        """Make the compute stream wait for the ticket; False if a load found its block missing
        or corrupt. Blocks the host only on I/O still running; GPU copies are waited by event."""
        start = time.perf_counter()
        ok = all([future.result() for future, *_ in ticket.loads])
        ok = all([future.result() for future in ticket.reads]) and ok
        for event in ticket.events:
            torch.cuda.current_stream(event.device).wait_event(event)
        self._upload(ticket)
        for future in ticket.saves:
            future.result()
        self.wait_s += time.perf_counter() - start
        return ok

    def finish(self, ticket: Ticket) -> bool:
        """Block the host until the ticket's copies are done (before freeing their source).

        Returns False if a load failed; raises the KVTierError of a failed save.
        """
        start = time.perf_counter()
        ok = all([future.result() for future, *_ in ticket.loads])
        ok = all([future.result() for future in ticket.reads]) and ok
        self._upload(ticket)
        for event in ticket.events:
            event.synchronize()
        for future in ticket.saves:
            future.result()
        self.wait_s += time.perf_counter() - start
        return ok

    def submit_saves(self, copies: Sequence[Copy]) -> list[Ticket]:
        """Save whole blocks to serialized stores in the I/O pool; one ticket per copy, settled
        like `submit`'s (`done` / `finish`, which raises the KVTierError of a failed save).

        A source is a block's host layers (CPU tensors; they must stay until the ticket is
        done), or a `Stored` block, read and verified first (relayed). Copies to a store with
        `save_blocks` (the remote tier) go in one pipelined call per SAVE_BATCH_BYTES, at most
        the store's `save_writers` of them at once, in order (the rest wait in a queue, not on
        I/O threads); others are saved one by one. A save the store did not take (0 bytes: a
        server down, slow or full, which the store warned about) fails its ticket with NotStored.
        """
        tickets = [Ticket() for _ in copies]
        batches: dict[int, list[tuple[Endpoint, Stored, Future]]] = {}  # by store, filling
        filled: dict[int, int] = {}  # bytes of each store's batch
        for (source, destination), ticket in zip(copies, tickets, strict=True):
            assert isinstance(destination, Stored) and destination.tiered_index is None
            ticket.saves.append(future := Future())
            store = destination.store
            if not hasattr(store, "save_blocks"):
                self.pool.submit(_save_batch, store, [(source, destination, future)])
                continue
            if filled.get(id(store), 0) >= SAVE_BATCH_BYTES:
                self._saves.submit(store, batches.pop(id(store)))
                filled[id(store)] = 0
            batches.setdefault(id(store), []).append((source, destination, future))
            filled[id(store)] = filled.get(id(store), 0) + _block_bytes(source)
        for batch in batches.values():
            self._saves.submit(batch[0][1].store, batch)
        return tickets

    def retire(self, tensors: list[torch.Tensor]) -> None:
        """Tensors about to be freed: their memory is not reused before the copies already
        queued on the mover's streams are done (they may still read or write it)."""
        for tensor in tensors:
            if not tensor.is_cuda:
                continue
            for (_, device, _), stream in self._streams.items():
                if device == tensor.device:
                    tensor.record_stream(stream)

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
    def _on_streams(
        self,
        lane: Lane,
        device: torch.device,
        groups: list[list[tuple[torch.Tensor, torch.Tensor]]],
        target: torch.Tensor | None,
    ) -> list[torch.cuda.Event]:
        """Queue each group of copies on a stream of the lane on `device`, one event each: a
        PREFETCH split in two (host-to-GPU copies, then those of resident blocks) runs its
        on-device copies on a stream of their own, beside the PCIe copies instead of holding
        them back (SPLIT_DEVICE_COPIES)."""
        # the streams start after the compute stream's current work (one event for them all)
        after = [torch.cuda.current_stream(device).record_event()]
        if lane is Lane.PREFETCH and device in self._d2h_dirty:
            self._d2h_dirty.discard(device)
            # staging buffers are also read by D2H writes of fresh tokens: not overwritten early
            after.append(self._stream(Lane.WRITE_BACK, device).record_event())
        events = []
        for resident, group in enumerate(groups):
            stream = self._stream(lane, device, resident=bool(resident))
            for event in after:
                stream.wait_event(event)
            if target is not None and target.device == device:
                self._record_use(target, stream)
            with torch.cuda.stream(stream):
                for src, dst in group:
                    dst.copy_(src, non_blocking=True)
                    if lane is Lane.WRITE_BACK:
                        src.record_stream(stream)
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)
        if lane is Lane.WRITE_BACK:
            self._d2h_dirty.add(device)
        return events

    def _record_use(self, target: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Once per buffer and stream: its memory is not reused while the stream may write it."""
        key = (id(target), stream.stream_id)
        if key not in self._recorded:
            target.record_stream(stream)
            self._recorded[key] = target

    def _load(self, ticket: Ticket, src: Stored, dst: torch.Tensor, *, now: bool) -> None:
        if dst.device.type == "cpu" and dst.is_contiguous():
            landing, up = dst, None
        else:
            pin = dst.device.type == "cuda"
            landing, up = torch.empty(dst.shape, dtype=dst.dtype, pin_memory=pin), dst
        future = self.pool.submit(src.store.load_into, src.key, src.tiered_index, landing)
        if now:
            future.result()  # the caller's next compute-ordered op may read it
        ticket.loads.append((future, landing, up))
        ticket.sources.append(src)

    def _upload(self, ticket: Ticket) -> None:
        """Issue the bounce -> destination copies of finished loads (compute-stream order)."""
        if ticket.uploaded:
            return
        ticket.uploaded = True
        pairs = [
            (landed, dst)
            for future, landed, dst in ticket.loads
            if dst is not None and future.result()
        ]
        for landed, dst in pairs:
            dst.copy_(landed, non_blocking=dst.is_cuda)
        self._count(sort_copies(pairs))

    def _stream(
        self, lane: Lane, device: torch.device, *, resident: bool = False
    ) -> torch.cuda.Stream:
        key = (lane, device, resident)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device)
        return self._streams[key]

    def _count(self, copies: Sorted) -> None:
        self.copies += copies.count
        self.h2d_bytes += copies.h2d_bytes
        self.d2h_bytes += copies.d2h_bytes
        self.d2d_bytes += copies.d2d_bytes


def _per_layer(source: Endpoint, destination: Endpoint) -> list[tuple[Endpoint, Endpoint]]:
    """Split a whole-block copy into one copy per layer (a save stays whole: one file)."""
    if isinstance(destination, Stored) and destination.tiered_index is None:
        return [(source, destination)]
    if isinstance(source, Stored) and source.tiered_index is None:
        assert isinstance(destination, tuple)
        return [(Stored(source.store, source.key, i), dst) for i, dst in enumerate(destination)]
    if isinstance(source, tuple):
        assert isinstance(destination, tuple) and len(source) == len(destination)
        return list(zip(source, destination, strict=True))
    return [(source, destination)]


def _relay(source: Stored, destination: Stored) -> int:
    """A whole block from one serialized store to another, through host memory (a disk file
    sent on to the server): verified when read, so a bad file is an error, never sent."""
    return _save(destination, _read_block(source))


def _read_block(source: Stored) -> tuple[torch.Tensor, ...]:
    """Every layer of a stored block in fresh host tensors; KVTierError if it cannot be read."""
    layers = tuple(source.store.layer_buffer() for _ in source.store.geometry.layer_ids)
    result = source.store.load_block(source.key, layers)
    if not result:
        raise KVTierError(f"block {source.key} could not be read to relay it ({result.value})")
    return layers


def _save(destination: Stored, layers: tuple[torch.Tensor, ...]) -> int:
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in layers), "save from host"
    return destination.store.save(destination.key, layers, parent_id=destination.parent_id)


def _block_bytes(source: Endpoint) -> int:
    if isinstance(source, Stored):
        return source.store.geometry.block_bytes
    return sum(t.nbytes for t in source)


def _save_batch(store: SerializedStore, batch: list[tuple[Endpoint, Stored, Future]]) -> None:
    """submit_saves' I/O task: read the relayed sources, save the blocks (one save_blocks call
    where the store has it), and settle every block's future, whatever happens."""
    try:
        ready: list[tuple[tuple[torch.Tensor, ...], Stored, Future]] = []
        for source, destination, future in batch:
            try:
                layers = _read_block(source) if isinstance(source, Stored) else source
            except KVTierError as error:
                future.set_exception(error)
                continue
            assert all(t.device.type == "cpu" and t.is_contiguous() for t in layers), "from host"
            ready.append((layers, destination, future))
        if hasattr(store, "save_blocks"):
            written = store.save_blocks(
                [destination.key for _, destination, _ in ready],
                [layers for layers, _, _ in ready],
                parent_ids=[destination.parent_id for _, destination, _ in ready],
            )
        else:
            written = [_save(destination, layers) for layers, destination, _ in ready]
        for (_, destination, future), nbytes in zip(ready, written, strict=True):
            if nbytes:
                future.set_result(nbytes)
            else:
                future.set_exception(NotStored(f"block {destination.key} was not stored"))
    except BaseException as error:  # every future settles: a waiter must never hang
        for _, _, future in batch:
            if not future.done():
                future.set_exception(error)
        if not isinstance(error, Exception):
            raise
