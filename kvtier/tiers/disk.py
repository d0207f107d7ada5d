"""Content-addressed disk block store: one safetensors file per block, atomic writes, verified reads.

Stores and checks bytes only; which blocks to write, read or delete is the controller's call.
The file format is DESIGN.md section 5; `_build_header` and `_parse_header` are its spec in code.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from kvtier.errors import BudgetError, ConfigError, KVTierError, StoreCorruptError
from kvtier.tiers.codec import Codec, checksum, choose_codec, decode_into, encode

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
# Disk speeds `codec="auto"` weighs the codec against unless told otherwise: write+fsync and cold
# read measured on the lent H100 host's virtio disk (DESIGN.md section 8).
DEFAULT_WRITE_GBPS = 1.3
DEFAULT_READ_GBPS = 1.9
_SAMPLE_BYTES = 4 << 20  # bytes of the first tensor that `auto` measures the codecs on
_MAX_HEADER_BYTES = 100 << 20  # a longer header length field is corruption, not a block
_ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{2,128}")
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}
_CHECKED_METADATA = ("format_version", "block_id", "fingerprint", "parent_id", "tensors")


class _Corrupt(StoreCorruptError):
    """A block file that fails verification; `cause` keys the warn-once log."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


@dataclass(frozen=True, slots=True)
class _Entry:
    """One tensor as its block file describes it; offsets are absolute in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: Codec
    raw_bytes: int
    checksum: str
    begin: int
    end: int


# File layout (plain safetensors): u64 little-endian header length, the JSON header padded with
# spaces to 8 bytes, then the payloads back to back in the caller's tensor order. A tensor's header
# entry has its real dtype and shape when raw, else "U8" [payload bytes]. `__metadata__` (all str):
# format_version "1", block_id, fingerprint, parent_id ("" for none), tensors (JSON: name ->
# dtype, shape, codec, raw_bytes, checksum of the raw bytes) and metadata_checksum (of the other
# five values, so that no flipped header byte goes unnoticed).
def _build_header(
    block_id: str, fingerprint: str, parent_id: str | None, items: list[tuple]
) -> bytes:
    """The length field and JSON header of a block file; `items` are (name, tensor, codec,
    payload, checksum) in file order."""
    header: dict[str, object] = {}
    described = {}
    offset = 0
    for name, tensor, codec, payload, digest in items:
        size = len(payload)
        stored = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape)}
        if codec is not Codec.RAW:
            stored = {"dtype": "U8", "shape": [size]}
        header[name] = {**stored, "data_offsets": [offset, offset + size]}
        described[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "codec": codec.value,
            "raw_bytes": tensor.nbytes,
            "checksum": digest,
        }
        offset += size
    meta = {
        "format_version": FORMAT_VERSION,
        "block_id": block_id,
        "fingerprint": fingerprint,
        "parent_id": parent_id or "",
        "tensors": json.dumps(described, separators=(",", ":")),
    }
    header["__metadata__"] = {**meta, "metadata_checksum": _metadata_checksum(meta)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text


def _metadata_checksum(meta: Mapping[str, str]) -> str:
    """Checksum of every other metadata value (tensor checksums included)."""
    return checksum(json.dumps([meta[key] for key in _CHECKED_METADATA]).encode())


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(dim) is int and dim >= 0 for dim in value):
        raise ValueError(f"shape {value!r} is not a list of sizes")
    return tuple(value)


def _parse_header(
    header: dict, data_start: int, file_bytes: int, block_id: str, fingerprint: str
) -> dict[str, _Entry]:
    """Check a block file's header against itself, its name and the file size; `_Corrupt` if not."""
    meta = header.pop("__metadata__")
    if meta["metadata_checksum"] != _metadata_checksum(meta):
        raise _Corrupt("metadata checksum mismatch", "the header's metadata changed after writing")
    if meta["format_version"] != FORMAT_VERSION:
        raise _Corrupt("unsupported format", f"format_version {meta['format_version']!r}")
    if meta["block_id"] != block_id or meta["fingerprint"] != fingerprint:
        raise _Corrupt("foreign block", "block id or model fingerprint differ from the file name")
    described = json.loads(meta["tensors"])
    if list(described) != list(header):
        raise ValueError(f"metadata names {list(described)} differ from tensors {list(header)}")
    entries = {}
    position = 0  # the data section is the payloads back to back in name order, nothing else
    for name, info in described.items():
        stored = header[name]
        begin, end = stored["data_offsets"]
        dtype = _DTYPE_BY_NAME[info["dtype"]]
        shape, codec = _shape(info["shape"]), Codec(info["codec"])
        raw_bytes = math.prod(shape) * dtype.itemsize
        if begin != position or type(end) is not int or end < begin:
            raise ValueError(f"{name}: data_offsets {stored['data_offsets']!r} at {position}")
        expected = (info["dtype"], list(shape)) if codec is Codec.RAW else ("U8", [end - begin])
        if (stored["dtype"], stored["shape"]) != expected or info["raw_bytes"] != raw_bytes:
            raise ValueError(f"{name}: stored {stored}, described {info}")
        if codec is Codec.RAW and end - begin != raw_bytes:
            raise ValueError(f"{name}: {end - begin} raw bytes stored, {raw_bytes} described")
        if not isinstance(info["checksum"], str):
            raise ValueError(f"{name}: checksum {info['checksum']!r}")
        entries[name] = _Entry(
            dtype, shape, codec, raw_bytes, info["checksum"], data_start + begin, data_start + end
        )
        position = end
    if data_start + position != file_bytes:
        raise _Corrupt(
            "truncated file", f"{file_bytes} bytes, header needs {data_start + position}"
        )
    return entries


def _read_exact_into(file: BinaryIO, offset: int, buffer: object) -> None:
    view = memoryview(buffer).cast("B")
    file.seek(offset)
    while view:
        count = file.readinto(view)
        if not count:
            raise _Corrupt("truncated file", f"ends before byte {offset + len(view)}")
        view = view[count:]


def _write_all(fd: int, buffer: bytes | memoryview) -> None:
    view = memoryview(buffer).cast("B")
    while view:
        view = view[os.write(fd, view) :]


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
                "positive; measure them with `kvtier bench` or leave the defaults"
            )
        if codec != "auto" and not isinstance(codec, Codec):
            names = [member.value for member in Codec]
            if codec not in names:
                raise ConfigError(f"disk.codec = {codec!r} is not a codec; use 'auto' or {names}")
            codec = Codec(codec)
        self.root = Path(root).expanduser()
        self._budget_bytes = budget_bytes
        self._fingerprint = fingerprint
        self._disk_gbps = (disk_write_gbps, disk_read_gbps)
        self._codec: Codec | None = None if codec == "auto" else codec
        self._codec_lock = threading.Lock()
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
            if tensor.dtype not in _DTYPES:
                raise KVTierError(f"{name}: dtype {tensor.dtype} cannot be stored; cast it first")
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                raise KVTierError(f"{name}: pass a contiguous CPU tensor (`.contiguous().cpu()`)")
        existing = self._existing_size(block_id, path)
        if existing is not None:
            return existing
        codec = self._resolve_codec(tensors)
        items = [
            (name, tensor, codec, encode(tensor, codec), checksum(tensor))
            for name, tensor in tensors.items()
        ]
        head = _build_header(block_id, self._fingerprint, parent_id, items)
        file_bytes = len(head) + sum(len(item[3]) for item in items)
        self._reserve(block_id, file_bytes)
        try:
            self._write_file(path, [head, *(item[3] for item in items)])
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
                except _Corrupt as error:
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

    def _resolve_codec(self, tensors: Mapping[str, torch.Tensor]) -> Codec:
        if self._codec is not None:
            return self._codec
        with self._codec_lock:  # one measurement per store, even with many writer threads
            if self._codec is None:
                first = next(
                    (t for t in tensors.values() if t.numel()), next(iter(tensors.values()))
                )
                sample = first.detach().reshape(-1)[: _SAMPLE_BYTES // first.element_size()]
                write_gbps, read_gbps = self._disk_gbps
                self._codec = choose_codec(
                    sample, disk_write_gbps=write_gbps, disk_read_gbps=read_gbps
                )
                log.info(
                    "disk store %s: codec auto chose %s (disk %.2f GB/s write, %.2f GB/s read)",
                    self.root,
                    self._codec.value,
                    write_gbps,
                    read_gbps,
                )
            return self._codec

    def _write_file(self, path: Path, buffers: list[bytes | memoryview]) -> None:
        """temp file in the target dir -> write -> fsync -> rename -> fsync dir; no temp left."""
        temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = -1
        renamed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            for buffer in buffers:
                _write_all(fd, buffer)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(temp, path)
            renamed = True
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
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
        finally:
            if fd >= 0:
                os.close(fd)
            if not renamed:
                temp.unlink(missing_ok=True)

    def _parse(self, file: BinaryIO, block_id: str) -> dict[str, _Entry]:
        file_bytes = os.fstat(file.fileno()).st_size
        if file_bytes < 8:
            raise _Corrupt("truncated file", f"{file_bytes} bytes")
        length_field = bytearray(8)
        _read_exact_into(file, 0, length_field)
        (header_bytes,) = struct.unpack("<Q", length_field)
        if header_bytes > min(_MAX_HEADER_BYTES, file_bytes - 8):
            raise _Corrupt("truncated file", f"header of {header_bytes} bytes in {file_bytes}")
        text = bytearray(header_bytes)
        _read_exact_into(file, 8, text)
        try:
            header = json.loads(text)
            return _parse_header(header, 8 + header_bytes, file_bytes, block_id, self._fingerprint)
        except _Corrupt:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise _Corrupt("unparsable header", repr(error)) from error

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

    def _read_entry_into(self, file: BinaryIO, entry: _Entry, out: torch.Tensor) -> None:
        if entry.codec is Codec.RAW:
            _read_exact_into(file, entry.begin, out.detach().reshape(-1).view(torch.uint8).numpy())
        else:
            payload = np.empty(entry.end - entry.begin, dtype=np.uint8)
            _read_exact_into(file, entry.begin, payload)
            try:
                decode_into(memoryview(payload), entry.codec, out)
            except StoreCorruptError as error:
                raise _Corrupt("undecodable payload", str(error)) from error
        if checksum(out) != entry.checksum:
            raise _Corrupt("checksum mismatch", f"tensor of {entry.raw_bytes} bytes")

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
            except _Corrupt as error:
                self._quarantine(block_id, file, error)
                return None
        read_bytes = min(entry.begin for entry in entries.values())  # the header
        read_bytes += sum(entries[name].end - entries[name].begin for name in names)
        with self._lock:
            self._counters["bytes_read"] += read_bytes
            self._counters["read_s"] += time.perf_counter() - started
        return result

    def _quarantine(self, block_id: str, file: BinaryIO, error: _Corrupt) -> None:
        """Move the corrupt file we have open out of v1/ (unless replaced meanwhile); warn once."""
        path = self._path(block_id)
        target = self.root / "quarantine" / f"{block_id}.{secrets.token_hex(4)}.safetensors"
        moved = False
        try:
            opened, current = os.fstat(file.fileno()), os.stat(path)
            if (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino):
                target.parent.mkdir(exist_ok=True)
                os.replace(path, target)
                moved = True
        except OSError as move_error:  # already moved or deleted by another reader
            log.debug("could not quarantine %s: %s", path, move_error)
        with self._lock:
            self._used_bytes -= self._sizes.pop(block_id, 0)
            self._quarantined += moved
            first = error.cause not in self._warned
            self._warned.add(error.cause)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "disk block %s failed verification (%s); %s, read as a miss%s",
            path,
            error,
            f"moved to {target}" if moved else "left in place",
            "; further failures of this kind log at DEBUG" if first else "",
        )

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
                "codec": self._codec.value if self._codec is not None else "auto",
                "quarantined": self._quarantined,
            }
