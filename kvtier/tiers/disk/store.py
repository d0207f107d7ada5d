"""DiskStore: one process's use of a block store that many processes share: its process area,
its budget, atomic writes, verified reads, quarantine, and a close() that never raises.

Stores and checks bytes only; which blocks to write, read or delete is the controller's call.
Paths and owners are areas.py; the store-wide budget, sweeps and GC ledger.py; one file's bytes
blockio.py and format.py; the POSIX steps files.py. docs/store.md states the guarantees.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from kvtier.errors import BudgetError, ConfigError, KVTierError
from kvtier.tiers.codec import Codec, CodecChoice
from kvtier.tiers.disk.areas import Owner, StoreLayout, check_format, temp_name
from kvtier.tiers.disk.blockio import check_tensors, encode_block
from kvtier.tiers.disk.files import (
    in_page_cache,
    link_durable,
    replace_link,
    touch,
    write_atomic,
)
from kvtier.tiers.disk.format import ReadResult
from kvtier.tiers.disk.holdings import Held, Holdings, OnceLog
from kvtier.tiers.disk.ledger import collect, release_bytes, reserve_bytes
from kvtier.tiers.disk.reads import BlockReader

log = logging.getLogger(__name__)

_ID_LOCKS = 64  # writes of one id are serialised in-process (striped locks)


class DiskStore:
    """This process's blocks in the store under `root`; every method is thread-safe.

    `budget_bytes` bounds both the files this store holds and, shared with every process, the
    whole store (GC makes room). `codec="auto"` picks a codec on the first write and keeps it.
    `model_key` is recorded in each file for `kvtier store ls`. Opening sweeps what dead
    processes left. Not fork-safe: open one per process.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        budget_bytes: int,
        codec: str | Codec = "auto",
        fingerprint: str,
        model_key: str = "",
        disk_write_gbps: float | None = None,  # None: measured by `kvtier bench`, or assumed
        disk_read_gbps: float | None = None,
    ) -> None:
        _check_options(budget_bytes, fingerprint, codec, disk_write_gbps, disk_read_gbps)
        self.root = Path(root).expanduser()
        self.layout = StoreLayout(self.root)
        self.model_key = model_key
        self._budget_bytes = budget_bytes
        self._fingerprint = fingerprint
        self._codec = CodecChoice(
            codec, disk_write_gbps=disk_write_gbps, disk_read_gbps=disk_read_gbps
        )
        self._lock = threading.Lock()  # guards the budget, reservations and counters
        self._id_locks = [threading.Lock() for _ in range(_ID_LOCKS)]
        self._reserved_bytes = 0  # budget held by writes in flight
        self._counters = {"bytes_written": 0, "write_s": 0.0}
        self._once = OnceLog(log)
        self._closed = False
        self.owner = Owner.current()
        try:
            check_format(self.layout, writer=self.owner)
            self.holdings = Holdings(self.layout, self.owner, self._once)
            self.reader = BlockReader(self.layout, self.holdings, fingerprint, self._once)
            collect(self.layout, max_bytes=None)  # sweep dead owners, exact ledger
        except OSError as error:
            raise KVTierError(
                f"cannot create the disk store at {self.root} ({error.strerror}); "
                "set disk.path to a writable local directory"
            ) from error
        self.area = self.holdings.area

    # -- writes --------------------------------------------------------------------------------
    def write_block(
        self,
        block_id: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        parent_id: str | None,
        persist: bool = True,
        tokens: int | None = None,
    ) -> int:
        """Write one block's tensors as a file and return its size in bytes; blocks until durable.

        `persist`: the block also goes to the shared area, for other processes and later runs;
        else only this process sees it and close() deletes it. A valid file with this id already
        there (ours or shared) is kept: equal ids hold equal data. `tokens` is recorded for
        `kvtier store ls`. Keeps no reference to `tensors`. BudgetError when the file fits
        neither this store's budget nor, after GC, the whole store's; KVTierError on any other
        failure. A failed write changes nothing already stored.
        """
        started = time.perf_counter()
        self.layout.shared(block_id)  # checks the id before anything else
        check_tensors(block_id, tensors)
        with self._id_locks[hash(block_id) % _ID_LOCKS]:
            if self._closed:
                raise KVTierError(f"the disk store at {self.root} is closed; open a new one")
            size = self._kept_size(block_id, persist=persist)
            if size is not None:
                return size
            size = self._write_new(block_id, tensors, parent_id=parent_id, tokens=tokens)
            if persist:
                self.publish(block_id)
            with self._lock:
                self._counters["write_s"] += time.perf_counter() - started
            return size

    def publish(self, block_id: str) -> bool:
        """Put a block this store holds into the shared area too (a hard link: no data copied).

        True if the shared area has it now; False if this store does not hold it or linking
        failed (logged; the block stays private).
        """
        held = self.holdings.get(block_id)
        if held is None or held.shared:
            return held is not None
        shared = self.layout.shared(block_id)
        try:
            landed = link_durable(held.path, shared)
        except OSError as error:
            self._once.warn(
                "publish", "could not publish %s (%s); it stays private", shared, error.strerror
            )
            return False
        if landed or not self._share_existing(block_id, held, shared):
            self.holdings.mark_shared(held)
        return True

    def adopt(self, block_id: str) -> int | None:
        """Hold a valid stored block (from any process) as this store's copy, pinned against GC;
        its file bytes, or None if there is none. BudgetError if it exceeds this store's budget."""
        held = self.holdings.get(block_id)
        if held is not None:
            return held.size
        with self._id_locks[hash(block_id) % _ID_LOCKS]:
            return self._kept_size(block_id, persist=False)

    def _kept_size(self, block_id: str, *, persist: bool) -> int | None:
        """Size of a valid file already holding `block_id`, now held by this store; else None."""
        held = self.holdings.get(block_id)
        if held is not None:
            if self.reader.probe_path(block_id, held.path) is ReadResult.OK:
                if persist:
                    self.publish(block_id)
                return held.size
            self.holdings.untrack(block_id)
        held = self.holdings.link_shared(block_id)
        if held is None:
            return None
        if self.reader.probe_path(block_id, held.path) is not ReadResult.OK:
            self.holdings.release(Held(held.path, held.size, shared=False, pinned=held.pinned))
            return None
        with self._lock:
            try:
                self._check_budget(block_id, held.size)
            except BudgetError:
                self.holdings.release(held)
                raise
            self.holdings.track(block_id, held)
        touch(held.path)
        return held.size

    def _write_new(
        self,
        block_id: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        parent_id: str | None,
        tokens: int | None,
    ) -> int:
        """Write the block's file into this store's area; returns its bytes."""
        codec = self._codec.resolve(tensors, where=self.root)
        labels = {
            key: value
            for key, value in (("model_key", self.model_key), ("tokens", tokens))
            if value
        }
        buffers = encode_block(
            block_id,
            tensors,
            codec=codec,
            fingerprint=self._fingerprint,
            parent_id=parent_id,
            labels=labels,
        )
        file_bytes = sum(memoryview(buffer).nbytes for buffer in buffers)
        path = self.area / self.layout.shared(block_id).name
        with self._lock:
            self._check_budget(block_id, file_bytes)
            self._reserved_bytes += file_bytes
        try:
            try:
                reserve_bytes(self.layout, file_bytes=file_bytes, max_bytes=self._budget_bytes)
            except OSError as error:
                raise self._io_error(path, error) from error
            try:
                write_atomic(path, buffers, temp_name=temp_name(path, self.owner, file_bytes))
            except OSError as error:
                release_bytes(self.layout, file_bytes)
                raise self._io_error(path, error) from error
        finally:
            with self._lock:
                self._reserved_bytes -= file_bytes
        self.holdings.track(block_id, Held(path, file_bytes, shared=False))
        with self._lock:
            self._counters["bytes_written"] += file_bytes
        return file_bytes

    def _share_existing(self, block_id: str, held: Held, shared: Path) -> bool:
        """Replace our private copy with a link to the shared one, if that one is valid; False
        if our copy stays private."""
        if self.reader.probe_path(block_id, shared) is not ReadResult.OK:
            return False
        try:
            size = shared.stat().st_size
            replace_link(shared, held.path)
        except OSError as error:
            log.debug("kept a private copy of %s: %s", block_id, error)
            return False
        release_bytes(self.layout, held.size)  # our own file is gone
        self.holdings.mark_shared(held, size=size)
        return True

    def _check_budget(self, block_id: str, file_bytes: int) -> None:
        used = self.holdings.used_bytes
        free = self._budget_bytes - used - self._reserved_bytes
        if file_bytes > free:
            raise BudgetError(
                f"disk store at {self.root} needs {file_bytes} bytes for block {block_id} but has "
                f"{max(free, 0)} of its {self._budget_bytes}-byte budget free ({used} "
                f"used, {self._reserved_bytes} being written); delete blocks or raise disk.budget"
            )

    def _io_error(self, path: Path, error: OSError) -> KVTierError:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return KVTierError(
                f"disk store at {self.root} is full ({os.strerror(error.errno)}); "
                "free space or lower disk.budget"
            )
        return KVTierError(
            f"could not write {path} ({error.strerror or error}); "
            "check that disk.path is a writable local directory"
        )

    # -- reads ---------------------------------------------------------------------------------
    def read_block(
        self, block_id: str, *, names: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The block's tensors (all, or `names`) as new CPU tensors; None if missing or corrupt.

        A corrupt file is moved to `<root>/quarantine/`. A name the block lacks raises KVTierError.
        """
        result, tensors = self.reader.read(block_id, None if names is None else list(names))
        return tensors if result else None

    def read_tensor_into(self, block_id: str, name: str, out: torch.Tensor) -> ReadResult:
        """Decode one stored tensor into `out` (contiguous CPU, same dtype and numel; may be pinned).

        Reads only that tensor's bytes. MISSING if no file holds the block, CORRUPT if it failed
        verification (quarantined); then `out` may hold garbage. KVTierError if `out` or `name`
        does not match what the block holds.
        """
        if out.device.type != "cpu" or not out.is_contiguous():
            raise KVTierError("read_tensor_into needs a contiguous CPU `out` tensor")
        return self.reader.read(block_id, [name], {name: out})[0]

    def read_into(self, block_id: str, outs: Mapping[str, torch.Tensor]) -> ReadResult:
        """Decode several tensors of one block into `outs[name]`, opening the file once."""
        return self.reader.read(block_id, list(outs), outs)[0]

    def probe(self, block_id: str) -> ReadResult:
        """Whether a file holds `block_id` with a valid header (payloads are checked on read).

        Opens the file and reads its header only; a corrupt header is quarantined.
        """
        return self.reader.probe(block_id)

    # -- bookkeeping ---------------------------------------------------------------------------
    def contains(self, block_id: str) -> bool:
        """Whether this store holds `block_id` or the shared area has it (not verified: a read
        may still miss)."""
        return any(path.is_file() for path in self.reader.paths(block_id))

    def in_page_cache(self, block_id: str) -> bool | None:
        """None when neither this store nor the shared area has a file of `block_id`; else
        whether the page cache holds it (files.in_page_cache): a read then runs at memory
        speed. Not verified, as `contains`."""
        for path in self.reader.paths(block_id):
            cached = in_page_cache(path)
            if cached is not None:
                return cached
        return None

    def delete(self, block_id: str) -> None:
        """Drop this store's copy; never raises. A persisted block stays in the shared area
        until GC; a file that cannot be deleted now is retried at close()."""
        held = self.holdings.untrack(block_id)
        if held is not None:
            self.holdings.release(held)

    def clear(self) -> None:
        """Drop every block this store holds (persisted ones stay shared); others' stay."""
        for block_id in self.holdings.ids():
            self.delete(block_id)

    def close(self) -> None:
        """Drop every block and delete this store's process area; never raises.

        Persisted blocks stay in the shared area, their last use recorded. A file that cannot be
        deleted (a store turned read-only) stays in the area, which the first open of the store
        after this process exits sweeps; a warning names it. Writes after close() raise.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.holdings.close()
        except Exception:  # close() must not raise: the next sweep finishes what this could not
            log.warning("closing the disk store at %s failed", self.root, exc_info=True)

    @property
    def budget_bytes(self) -> int:
        return self._budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        with self._lock:
            self._budget_bytes = value

    @property
    def bytes_used(self) -> int:
        """Bytes of the block files this store holds (wrote or adopted) and has not deleted."""
        return self.holdings.used_bytes

    def stats(self) -> dict[str, object]:
        """Counters since construction; `codec` is "auto" until the first write chooses one."""
        with self._lock:
            return {
                "bytes_used": self.holdings.used_bytes,
                "blocks": len(self.holdings),
                **self._counters,
                **self.reader.stats(),
                "codec": self._codec.value,
            }


def _check_options(
    budget_bytes: object,
    fingerprint: object,
    codec: object,
    write_gbps: float | None,
    read_gbps: float | None,
) -> None:
    if not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ConfigError(f"disk budget_bytes = {budget_bytes!r}; use a byte count >= 0")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ConfigError("DiskStore needs the model fingerprint (a non-empty str)")
    if not all(speed is None or speed > 0 for speed in (write_gbps, read_gbps)):
        raise ConfigError(
            f"disk speeds {write_gbps} / {read_gbps} GB/s (write / read) must be "
            "positive; leave the defaults or pass measured speeds"
        )
    if codec != "auto" and not isinstance(codec, Codec):
        names = [member.value for member in Codec]
        if codec not in names:
            raise ConfigError(f"disk.codec = {codec!r} is not a codec; use 'auto' or {names}")
