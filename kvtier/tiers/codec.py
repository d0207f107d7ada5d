"""Byte codecs for disk blocks: raw passthrough, lz4, byte-shuffle + lz4, raw-byte checksums,
and the choice between them (`choose_codec`'s one cost rule, made once per store by CodecChoice).

Pure functions on contiguous CPU tensors and byte buffers; no files.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import logging
import math
import struct
import threading
import time
from collections.abc import Callable, Mapping

import lz4.block
import numpy as np
import torch
import xxhash

from kvtier.errors import KVTierError, StoreCorruptError
from kvtier.measured import (
    ASSUMED,
    ASSUMED_DISK_READ_GBPS,
    ASSUMED_DISK_WRITE_GBPS,
    disk_speeds,
)

log = logging.getLogger(__name__)

# Disk speeds `codec="auto"` weighs the codecs against when told none and `kvtier bench` has not
# measured the store's file system (kvtier/measured.py says where these figures come from).
DEFAULT_WRITE_GBPS = ASSUMED_DISK_WRITE_GBPS
DEFAULT_READ_GBPS = ASSUMED_DISK_READ_GBPS
SAMPLE_BYTES = 4 << 20  # bytes of the first tensor that `auto` measures the codecs on

# Raw bytes per independently compressed lz4 chunk: chunks can be (de)compressed in parallel and
# bound the temporary buffers one call needs.
CHUNK_BYTES = 4 << 20

# Compressed payload layout (little-endian): u32 chunk_bytes, u32 n_chunks,
# u32 compressed size of each chunk, then the chunks back to back. The total raw length is not in
# the payload: the caller keeps it (the disk store's metadata) and passes `out` of that size.
_PAYLOAD_HEAD = struct.Struct("<II")


class Codec(enum.Enum):
    """How a tensor's bytes are stored: as is, lz4, or byte-shuffled then lz4."""

    RAW = "raw"
    LZ4 = "lz4"
    SHUFFLE_LZ4 = "shuffle+lz4"


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor sharing its memory (no copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise KVTierError(
            f"codec needs a contiguous CPU tensor, got device={tensor.device} "
            f"contiguous={tensor.is_contiguous()}; pass `tensor.contiguous().cpu()`"
        )
    return tensor.detach().reshape(-1).view(torch.uint8)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a flat memoryview of its own memory (no copy), which keeps the
    tensor alive. ~1.3 us, where the torch and numpy views it replaces took ~6.6 (2-core dev
    box): a 1 MiB block of 8 layers takes one per layer on every save and load."""
    if not tensor.is_cpu or not tensor.is_contiguous():
        _byte_view(tensor)  # raises, with the fix
    array = (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())
    array.tensor = tensor  # the memory's owner lives as long as the view
    return memoryview(array).cast("B")


def encode(tensor: torch.Tensor, codec: Codec) -> bytes | memoryview:
    """Encode a contiguous CPU tensor's bytes with `codec`; returns the payload.

    For RAW the payload is a memoryview of the tensor's own memory (no copy): use it before the
    tensor is changed or freed. The raw length (`tensor.nbytes`) is not in the payload. lz4 runs
    on independent CHUNK_BYTES chunks of the (shuffled) bytes.
    """
    if codec is Codec.RAW:
        return byte_view(tensor)
    raw = _byte_view(tensor).numpy()  # [nbytes] uint8, shares memory
    itemsize = tensor.element_size()
    if codec is Codec.SHUFFLE_LZ4 and itemsize > 1 and raw.size:
        # [n, itemsize] -> [itemsize, n]: byte k of every element lands together, so the slowly
        # varying sign/exponent bytes of bf16/fp16 form long compressible runs.
        raw = np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)
    source = memoryview(raw)
    chunks = [
        lz4.block.compress(source[start : start + CHUNK_BYTES], store_size=False)
        for start in range(0, len(source), CHUNK_BYTES)
    ]
    head = _PAYLOAD_HEAD.pack(CHUNK_BYTES, len(chunks))
    sizes = struct.pack(f"<{len(chunks)}I", *(len(chunk) for chunk in chunks))
    return b"".join([head, sizes, *chunks])


def _split_chunks(payload: memoryview, raw_bytes: int) -> list[tuple[memoryview, int]]:
    """(compressed chunk, raw size) pairs of a compressed payload; StoreCorruptError if malformed."""
    if len(payload) < _PAYLOAD_HEAD.size:
        raise StoreCorruptError(f"lz4 payload of {len(payload)} bytes is shorter than its header")
    chunk_bytes, n_chunks = _PAYLOAD_HEAD.unpack_from(payload)
    expected = math.ceil(raw_bytes / chunk_bytes) if chunk_bytes else -1
    if (raw_bytes and chunk_bytes == 0) or n_chunks != max(expected, 0):
        raise StoreCorruptError(
            f"lz4 payload has {n_chunks} chunks of {chunk_bytes} bytes; "
            f"{raw_bytes} raw bytes need {expected}"
        )
    table_end = _PAYLOAD_HEAD.size + 4 * n_chunks
    if len(payload) < table_end:
        raise StoreCorruptError("lz4 payload is shorter than its chunk table")
    sizes = struct.unpack_from(f"<{n_chunks}I", payload, _PAYLOAD_HEAD.size)
    if table_end + sum(sizes) != len(payload):
        raise StoreCorruptError(
            f"lz4 chunk sizes add up to {table_end + sum(sizes)} bytes, payload has {len(payload)}"
        )
    result = []
    offset = table_end
    for index, size in enumerate(sizes):
        raw_size = min(chunk_bytes, raw_bytes - index * chunk_bytes)
        result.append((payload[offset : offset + size], raw_size))
        offset += size
    return result


def _decompress(chunk: memoryview, raw_size: int) -> np.ndarray:
    """One lz4 chunk as a flat read-only uint8 array of exactly `raw_size` bytes."""
    try:
        data = lz4.block.decompress(chunk, uncompressed_size=raw_size)
    except lz4.block.LZ4BlockError as error:
        raise StoreCorruptError(f"lz4 chunk does not decompress: {error}") from error
    if len(data) != raw_size:
        raise StoreCorruptError(f"lz4 chunk decompressed to {len(data)} bytes, expected {raw_size}")
    return np.frombuffer(data, dtype=np.uint8)


def decode_into(payload: bytes | memoryview, codec: Codec, out: torch.Tensor) -> None:
    """Decode `payload` straight into `out`, a preallocated contiguous CPU tensor (may be pinned).

    `out.nbytes` must be the raw length the payload was encoded from. Raises StoreCorruptError
    when the payload is malformed; a well-formed payload of wrong bytes is caught by the
    block's `Checksum`. Copies go through numpy, single-threaded: torch's intra-op threads,
    called from many I/O threads at once, oversubscribe the cores (a 512 KiB torch copy took
    8 ms instead of 15 us on the busy 2-core dev container).
    """
    target = _byte_view(out).numpy()  # [nbytes] uint8 view of out
    payload = memoryview(payload).cast("B")
    if codec is Codec.RAW:
        if len(payload) != target.size:
            raise StoreCorruptError(
                f"raw payload has {len(payload)} bytes, the tensor needs {target.size}"
            )
        target[:] = np.frombuffer(payload, dtype=np.uint8)
        return
    itemsize = out.element_size()
    count = out.numel()
    shuffled = codec is Codec.SHUFFLE_LZ4 and itemsize > 1
    planes = target.reshape(count, itemsize) if count else target  # [n, itemsize]
    position = 0  # offset in the (shuffled) raw byte stream
    for chunk, raw_size in _split_chunks(payload, target.size):
        data = _decompress(chunk, raw_size)
        if not shuffled:
            target[position : position + raw_size] = data
        else:
            # The shuffled stream is `itemsize` planes of `count` bytes; a chunk may span planes.
            # A column copy per plane: ~3 GB/s; one [itemsize, n] transpose: ~0.4 (2-core dev box).
            done = 0
            while done < raw_size:
                plane, index = divmod(position + done, count)
                take = min(count - index, raw_size - done)
                planes[index : index + take, plane] = data[done : done + take]
                done += take
        position += raw_size


class Checksum(enum.Enum):
    """A checksum of raw bytes, by the name a block file's header records (format 2 on).

    Speeds on the 2-core dev box (one core, large buffers): xxh3-128 10.8-14 GB/s, sha256
    1.25-1.6 (SHA-NI), blake2b-128 0.74-0.79. All three release the GIL on large buffers (hashlib,
    python-xxhash >= 3.0), so several threads hash on several cores.
    """

    XXH3_128 = "xxh3-128"  # format 2's: catches accidents at memory speed; anyone can forge it
    SHA256 = "sha256"  # collision resistant: what a signed remote value's header holds
    BLAKE2B_128 = "blake2b-128"  # format 1's, for reading older files

    @property
    def cryptographic(self) -> bool:
        """Whether finding other bytes with the same digest is infeasible (what an HMAC over a
        header of digests needs to vouch for the bytes themselves)."""
        return self is not Checksum.XXH3_128

    def of(self, buffer: torch.Tensor | bytes | bytearray | memoryview | np.ndarray) -> str:
        """Hex digest of raw bytes; a tensor is hashed in place, without a copy."""
        if isinstance(buffer, torch.Tensor):
            buffer = byte_view(buffer)
        if self is Checksum.XXH3_128:
            return xxhash.xxh3_128_hexdigest(buffer)
        if self is Checksum.SHA256:
            return hashlib.sha256(buffer).hexdigest()
        return hashlib.blake2b(buffer, digest_size=16).hexdigest()


def _best_seconds(action: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def measure_codec(sample: torch.Tensor, *, repeats: int = 3) -> dict[str, dict[str, float]]:
    """Compression ratio and encode/decode GB/s of every codec on `sample` (a contiguous CPU tensor).

    Returns `{codec.value: {"ratio": raw/payload, "encode_gbps": .., "decode_gbps": ..}}`, speeds
    in raw bytes (1e9) per second on one thread, best of `repeats`.
    """
    raw_bytes = max(sample.nbytes, 1)
    out = torch.empty_like(sample)
    result = {}
    for codec in Codec:
        payload = encode(sample, codec)
        encode_s = _best_seconds(lambda codec=codec: encode(sample, codec), repeats)
        decode_s = _best_seconds(
            lambda codec=codec, payload=payload: decode_into(payload, codec, out), repeats
        )
        result[codec.value] = {
            "ratio": raw_bytes / max(len(payload), 1),
            "encode_gbps": raw_bytes / encode_s / 1e9,
            "decode_gbps": raw_bytes / decode_s / 1e9,
        }
    return result


def choose_codec(sample: torch.Tensor, *, disk_write_gbps: float, disk_read_gbps: float) -> Codec:
    """Pick the codec with the least end-to-end seconds per raw byte for one write plus one read.

    Codec work and disk I/O overlap across blocks, so each direction costs the slower of the two:
    `max(1 / codec_gbps, 1 / (disk_gbps * ratio))`, summed over write (encode) and read (decode).
    RAW's codec time is ~0 (encode is a view, decode one memcpy), so it costs about
    `1/disk_write_gbps + 1/disk_read_gbps`; a compressing codec wins only where its throughput
    beats the disk's and its ratio is above 1. Ties go to RAW.
    """
    if disk_write_gbps <= 0 or disk_read_gbps <= 0:
        raise KVTierError(
            f"disk speeds must be positive, got write {disk_write_gbps} GB/s and read "
            f"{disk_read_gbps} GB/s; pass measured speeds or leave the defaults"
        )
    measured = measure_codec(sample)
    best, best_cost = Codec.RAW, math.inf
    for codec in Codec:  # RAW first: it keeps ties
        numbers = measured[codec.value]
        ratio = numbers["ratio"]
        cost = max(1 / numbers["encode_gbps"], 1 / (disk_write_gbps * ratio)) + max(
            1 / numbers["decode_gbps"], 1 / (disk_read_gbps * ratio)
        )
        log.debug("codec %s: ratio %.3f, %.3f ns per raw byte", codec.value, ratio, cost)
        if cost < best_cost:
            best, best_cost = codec, cost
    return best


class CodecChoice:
    """A store's codec: fixed, or for "auto" chosen on the first tensors written and then kept.

    The disk speeds it weighs codecs against: as given, else what `kvtier bench` measured on the
    store's file system (`where` at the first write), else the assumed defaults. Thread-safe:
    many writer threads measure once between them.
    """

    def __init__(
        self,
        spec: str | Codec,
        *,
        disk_write_gbps: float | None = None,
        disk_read_gbps: float | None = None,
    ) -> None:
        self._codec: Codec | None = None if spec == "auto" else Codec(spec)
        self._disk_gbps = (disk_write_gbps, disk_read_gbps)
        self._lock = threading.Lock()

    @property
    def value(self) -> str:
        """The codec's name, or "auto" until the first write chooses one."""
        return self._codec.value if self._codec is not None else "auto"

    def resolve(self, tensors: Mapping[str, torch.Tensor], *, where: object) -> Codec:
        """The codec to write `tensors` with; on the first call of an auto choice, measures."""
        if self._codec is not None:
            return self._codec
        with self._lock:
            if self._codec is None:
                first = next(
                    (t for t in tensors.values() if t.numel()), next(iter(tensors.values()))
                )
                sample = first.detach().reshape(-1)[: SAMPLE_BYTES // first.element_size()]
                write_gbps, read_gbps, source = self._speeds(where)
                self._codec = choose_codec(
                    sample, disk_write_gbps=write_gbps, disk_read_gbps=read_gbps
                )
                log.info(
                    "disk store %s: codec auto chose %s (disk %.2f GB/s write, %.2f GB/s read: %s)",
                    where,
                    self._codec.value,
                    write_gbps,
                    read_gbps,
                    source,
                )
            return self._codec

    def _speeds(self, where: object) -> tuple[float, float, str]:
        write_gbps, read_gbps = self._disk_gbps
        if write_gbps is not None and read_gbps is not None:
            return write_gbps, read_gbps, "as configured"
        try:
            measured = disk_speeds(str(where))
        except OSError:  # the store path cannot be looked at: the write will say why
            return DEFAULT_WRITE_GBPS, DEFAULT_READ_GBPS, ASSUMED
        return (
            measured.write.gbps if write_gbps is None else write_gbps,
            measured.read.gbps if read_gbps is None else read_gbps,
            measured.write.source,
        )
