"""DiskStore: block files under one root: budget, reservations, verified reads, quarantine.

Stores and checks bytes only; which blocks to write, read or delete is the controller's call.
The file layout is format.py; the atomic write and exact read are files.py.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from kvtier.errors import BudgetError, ConfigError, KVTierError, StoreCorruptError
from kvtier.tiers.codec import (
    DEFAULT_READ_GBPS,
    DEFAULT_WRITE_GBPS,
    Codec,
    CodecChoice,
    checksum,
    decode_into,
    encode,
)
from kvtier.tiers.disk.files import quarantine, read_exact_into, write_atomic
from kvtier.tiers.disk.format import DTYPES, Corrupt, Entry, Payload, build_header, read_header

log = logging.getLogger(__name__)

_ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{2,128}")


class DiskStore:
    """Block files under `<root>/v1/<id[:2]>/<id>.safetensors`; every method is thread-safe.

    `budget_bytes` bounds the bytes of the files this instance wrote (or adopted by writing an
    id that already existed). `codec="auto"` picks a codec on the first write and keeps it.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        budget_bytes: int,
        codec: str | Codec = "auto",
        fingerprint: str,
        disk_write_gbps: float = DEFAULT_WRITE_GBPS,
        disk_read_gbps: float = DEFAULT_READ_GBPS,
    ) -> None:
        if not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ConfigError(f"disk budget_bytes = {budget_bytes!r}; use a byte count >= 0")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ConfigError("DiskStore needs the model fingerprint (a non-empty str)")
        if not (disk_write_gbps > 0 and disk_read_gbps > 0):
            raise ConfigError(
                f"disk speeds {disk_write_gbps} / {disk_read_gbps} GB/s (write / read) must be "
                "positive; leave the defaults or pass measured speeds"
            )
        if codec != "auto" and not isinstance(codec, Codec):
            names = [member.value for member in Codec]
            if codec not in names:
                raise ConfigError(f"disk.codec = {codec!r} is not a codec; use 'auto' or {names}")
        self.root = Path(root).expanduser()
        self._budget_bytes = budget_bytes
        self._fingerprint = fingerprint
        self._codec = CodecChoice(
            codec, disk_write_gbps=disk_write_gbps, disk_read_gbps=disk_read_gbps
        )
        self._lock = threading.Lock()  # guards everything below
        self._sizes: dict[str, int] = {}  # block id -> file bytes, for files this store counts
        self._used_bytes = 0
        self._reserved_bytes = 0  # budget held by writes in flight
        self._counters = {"bytes_written": 0, "bytes_read": 0, "write_s": 0.0, "read_s": 0.0}
        self._quarantined = 0
        self._warned: set[str] = set()
        try:
            (self.root / "v1").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise KVTierError(
                f"cannot create the disk store at {self.root} ({error.strerror}); "
                "set disk.path to a writable local directory"
            ) from error

    def _path(self, block_id: str) -> Path:
        if not isinstance(block_id, str) or not _ID_PATTERN.fullmatch(block_id):
            raise KVTierError(f"block id {block_id!r} is not 2-128 characters of [0-9A-Za-z_-]")
        return self.root / "v1" / block_id[:2] / f"{block_id}.safetensors"

    # -- writes --------------------------------------------------------------------------------
    def write_block(
        self, block_id: str, tensors: Mapping[str, torch.Tensor], *, parent_id: str | None
    ) -> int:
        """Write one block's tensors as a file and return its size in bytes; blocks until durable.

        A valid file with this id already there is kept (equal ids hold equal data). Keeps no
        reference to `tensors` after it returns. BudgetError when the file does not fit.
        """
        started = time.perf_counter()
        path = self._path(block_id)
        if not tensors:
            raise KVTierError(f"block {block_id} has no tensors; write at least one")
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise KVTierError(f"tensor name {name!r} is not usable; use names like 'l0.k'")
            if tensor.dtype not in DTYPES:
                raise KVTierError(f"{name}: dtype {tensor.dtype} cannot be stored; cast it first")
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise KVTierError(f"{name}: pass a contiguous CPU tensor (`.contiguous().cpu()`)")
        existing = self._existing_size(block_id, path)
        if existing is not None:
            return existing
        codec = self._codec.resolve(tensors, where=self.root)
        payloads = [
            Payload(name, tensor, codec, encode(tensor, codec), checksum(tensor))
            for name, tensor in tensors.items()
        ]
        head = build_header(block_id, self._fingerprint, parent_id, payloads)
        file_bytes = len(head) + sum(len(item.data) for item in payloads)
        self._reserve(block_id, file_bytes)
        try:
            self._write_file(path, [head, *(item.data for item in payloads)])
        finally:
            with self._lock:
                self._reserved_bytes -= file_bytes
        with self._lock:
            if block_id not in self._sizes:  # a concurrent write of this id may have counted it
                self._sizes[block_id] = file_bytes
                self._used_bytes += file_bytes
            self._counters["bytes_written"] += file_bytes
            self._counters["write_s"] += time.perf_counter() - started
        return file_bytes

    def _existing_size(self, block_id: str, path: Path) -> int | None:
        """Size of a valid file already holding `block_id`, now counted by this store; else None."""
        try:
            with open(path, "rb", buffering=0) as file:
                try:
                    self._parse(file, block_id)
                except Corrupt as error:
                    self._quarantine(block_id, file, error)
                    return None
                file_bytes = os.fstat(file.fileno()).st_size
        except FileNotFoundError:
            with self._lock:
                self._used_bytes -= self._sizes.pop(block_id, 0)  # deleted behind our back
            return None
        with self._lock:
            if block_id not in self._sizes:
                self._check_budget(block_id, file_bytes)
                self._sizes[block_id] = file_bytes
                self._used_bytes += file_bytes
        return file_bytes

    def _check_budget(self, block_id: str, file_bytes: int) -> None:
        free = self._budget_bytes - self._used_bytes - self._reserved_bytes
        if file_bytes > free:
            raise BudgetError(
                f"disk store at {self.root} needs {file_bytes} bytes for block {block_id} but has "
                f"{max(free, 0)} of its {self._budget_bytes}-byte budget free ({self._used_bytes} "
                f"used, {self._reserved_bytes} being written); delete blocks or raise disk.budget"
            )

    def _reserve(self, block_id: str, file_bytes: int) -> None:
        with self._lock:
            self._check_budget(block_id, file_bytes)
            self._reserved_bytes += file_bytes

    def _write_file(self, path: Path, buffers: list[bytes | memoryview]) -> None:
        try:
            write_atomic(path, buffers)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                message = (
                    f"disk store at {self.root} is full ({os.strerror(error.errno)}); "
                    "free space or lower disk.budget"
                )
            else:
                message = (
                    f"could not write {path} ({error.strerror or error}); "
                    "check that disk.path is a writable local directory"
                )
            raise KVTierError(message) from error

    # -- reads ---------------------------------------------------------------------------------
    def read_block(
        self, block_id: str, *, names: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The block's tensors (all, or `names`) as new CPU tensors; None if missing or corrupt.

        A corrupt file is moved to `<root>/quarantine/`. A name the block lacks raises KVTierError.
        """
        return self._read(block_id, None if names is None else list(names), None)

    def read_tensor_into(self, block_id: str, name: str, out: torch.Tensor) -> bool:
        """Decode one stored tensor into `out` (contiguous CPU, same dtype and numel; may be pinned).

        Reads only that tensor's bytes. False if the block is missing or corrupt (then `out` may
        hold garbage); KVTierError if `out` or `name` does not match what the block holds.
        """
        if out.device.type != "cpu" or not out.is_contiguous():
            raise KVTierError("read_tensor_into needs a contiguous CPU `out` tensor")
        return self._read(block_id, [name], out) is not None

    def _read(
        self, block_id: str, names: list[str] | None, out: torch.Tensor | None
    ) -> dict[str, torch.Tensor] | None:
        """Verified tensors of one block, decoded into `out` (one name) or new tensors."""
        started = time.perf_counter()
        file = self._open(block_id)
        if file is None:
            return None
        with file:
            try:
                entries = self._parse(file, block_id)
                names = list(entries) if names is None else names
                missing = [name for name in names if name not in entries]
                if missing:
                    raise KVTierError(
                        f"block {block_id} has no tensor {missing}; it holds {list(entries)}"
                    )
                result = {}
                for name in names:
                    entry = entries[name]
                    if out is None:
                        result[name] = torch.empty(entry.shape, dtype=entry.dtype)
                    elif out.dtype == entry.dtype and out.numel() == math.prod(entry.shape):
                        result[name] = out
                    else:
                        raise KVTierError(
                            f"block {block_id} holds {name} as {entry.dtype} {list(entry.shape)} "
                            f"but `out` is {out.dtype} {list(out.shape)}; pass a buffer of that "
                            "dtype and size (is the store from another model or block layout?)"
                        )
                    self._read_entry_into(file, entry, result[name])
            except Corrupt as error:
                self._quarantine(block_id, file, error)
                return None
        read_bytes = min(entry.begin for entry in entries.values())  # the header
        read_bytes += sum(entries[name].end - entries[name].begin for name in names)
        with self._lock:
            self._counters["bytes_read"] += read_bytes
            self._counters["read_s"] += time.perf_counter() - started
        return result

    def _parse(self, file: BinaryIO, block_id: str) -> dict[str, Entry]:
        return read_header(file, os.fstat(file.fileno()).st_size, block_id, self._fingerprint)

    def _open(self, block_id: str) -> BinaryIO | None:
        try:
            return open(self._path(block_id), "rb", buffering=0)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise KVTierError(
                f"cannot read block {block_id} in {self.root} ({error.strerror}); "
                "check the permissions of disk.path"
            ) from error

    def _read_entry_into(self, file: BinaryIO, entry: Entry, out: torch.Tensor) -> None:
        try:
            if entry.codec is Codec.RAW:
                target = out.detach().reshape(-1).view(torch.uint8).numpy()
                read_exact_into(file, entry.begin, target)
            else:
                payload = np.empty(entry.end - entry.begin, dtype=np.uint8)
                read_exact_into(file, entry.begin, payload)
                decode_into(memoryview(payload), entry.codec, out)
        except EOFError as error:
            raise Corrupt("truncated file", str(error)) from None
        except StoreCorruptError as error:
            raise Corrupt("undecodable payload", str(error)) from error
        if checksum(out) != entry.checksum:
            raise Corrupt("checksum mismatch", f"tensor of {entry.raw_bytes} bytes")

    def _quarantine(self, block_id: str, file: BinaryIO, error: Corrupt) -> None:
        """Move the corrupt file we have open out of v1/ (unless replaced meanwhile); warn once."""
        path = self._path(block_id)
        target = quarantine(path, file, self.root / "quarantine")
        with self._lock:
            self._used_bytes -= self._sizes.pop(block_id, 0)
            self._quarantined += target is not None
            first = error.cause not in self._warned
            self._warned.add(error.cause)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "disk block %s failed verification (%s); %s, read as a miss%s",
            path,
            error,
            f"moved to {target}" if target is not None else "left in place",
            "; further failures of this kind log at DEBUG" if first else "",
        )

    # -- bookkeeping ---------------------------------------------------------------------------
    def contains(self, block_id: str) -> bool:
        """Whether a file for `block_id` exists (not verified: a read may still miss)."""
        return self._path(block_id).is_file()

    def delete(self, block_id: str) -> None:
        """Remove the block's file; a missing file is fine."""
        try:
            self._path(block_id).unlink(missing_ok=True)
        except OSError as error:
            raise KVTierError(
                f"cannot delete block {block_id} in {self.root} ({error.strerror}); "
                "check the permissions of disk.path"
            ) from error
        with self._lock:
            self._used_bytes -= self._sizes.pop(block_id, 0)

    def clear(self) -> None:
        """Delete every block file this store counts; other files under root stay."""
        with self._lock:
            block_ids = list(self._sizes)
        for block_id in block_ids:
            self.delete(block_id)
        for shard in {self._path(block_id).parent for block_id in block_ids}:
            try:
                shard.rmdir()
            except OSError:
                pass  # not empty: other stores' blocks or a writer's temp file

    @property
    def budget_bytes(self) -> int:
        return self._budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        with self._lock:
            self._budget_bytes = value

    @property
    def bytes_used(self) -> int:
        """Bytes of the block files this store wrote or adopted and has not deleted."""
        with self._lock:
            return self._used_bytes

    def stats(self) -> dict[str, object]:
        """Counters since construction; `codec` is "auto" until the first write chooses one."""
        with self._lock:
            return {
                "bytes_used": self._used_bytes,
                "blocks": len(self._sizes),
                **self._counters,
                "codec": self._codec.value,
                "quarantined": self._quarantined,
            }
