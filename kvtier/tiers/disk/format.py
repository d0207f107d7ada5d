"""The block-file format: the spec of one block's file, in code (header build and parse, dtypes).

A file is plain safetensors: u64 little-endian header length, the JSON header padded with spaces
to 8 bytes, then the payloads back to back in the writer's tensor order. A tensor's header entry
has its real dtype and shape when raw, else "U8" [payload bytes]. `__metadata__` (all str):
format_version, block_id, fingerprint, parent_id ("" for none), tensors (JSON: name -> dtype,
shape, codec, raw_bytes, checksum of the raw bytes), checksum_algorithm (format 2: the name of
every checksum's algorithm, "xxh3-128" or "sha256"; format 1 has none and means blake2b-128) and
metadata_checksum (of the other values, so that no flipped header byte goes unnoticed).
Optional, for people and `kvtier store`: labels (JSON: model_key, tokens) with labels_checksum,
both or neither; readers that predate them ignore both. Files of format 1 are still read (for
`kvtier store`); newer formats are refused. No file I/O beyond reading a header.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import torch

from kvtier.blocks import FORMAT_VERSION, READABLE_FORMATS
from kvtier.errors import StoreCorruptError
from kvtier.tiers.codec import Checksum, Codec
from kvtier.tiers.disk.files import read_exact_into

MAX_HEADER_BYTES = 100 << 20  # a longer header length field is corruption, not a block
DTYPES = {
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
_DTYPE_BY_NAME = {name: dtype for dtype, name in DTYPES.items()}
# The metadata values each format's metadata_checksum covers, in order.
_CHECKED_METADATA = {
    "1": ("format_version", "block_id", "fingerprint", "parent_id", "tensors"),
    "2": (
        "format_version",
        "block_id",
        "fingerprint",
        "parent_id",
        "tensors",
        "checksum_algorithm",
    ),
}
assert tuple(_CHECKED_METADATA) == READABLE_FORMATS and READABLE_FORMATS[-1] == FORMAT_VERSION


class ReadResult(enum.Enum):
    """How reading a stored block went; only OK is truthy, so `if store.read...:` still reads."""

    OK = "ok"
    MISSING = "missing"  # no file: never written, collected, or deleted by its process: recompute
    CORRUPT = "corrupt"  # the file failed verification and was quarantined: recompute

    def __bool__(self) -> bool:
        return self is ReadResult.OK


class Corrupt(StoreCorruptError):
    """A block file that fails verification; `cause` keys the warn-once log."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor as its block file describes it; offsets are absolute in the file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: Codec
    raw_bytes: int
    checksum: str
    begin: int
    end: int


@dataclass(frozen=True, slots=True)
class Header:
    """A verified header: the tensors by name (file order) and what the metadata says."""

    entries: dict[str, Entry]
    fingerprint: str
    parent_id: str
    labels: dict[str, object] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    algorithm: Checksum = Checksum.XXH3_128  # of every checksum in the file

    @property
    def raw_bytes(self) -> int:
        return sum(entry.raw_bytes for entry in self.entries.values())

    @property
    def data_start(self) -> int:
        return min((entry.begin for entry in self.entries.values()), default=0)


@dataclass(frozen=True, slots=True)
class Payload:
    """One tensor ready to write: its encoded bytes and the checksum of its raw bytes (with the
    algorithm the header will name)."""

    name: str
    tensor: torch.Tensor
    codec: Codec
    data: bytes | memoryview
    checksum: str


def build_header(
    block_id: str,
    fingerprint: str,
    parent_id: str | None,
    payloads: list[Payload],
    *,
    labels: Mapping[str, object] | None = None,
    algorithm: Checksum = Checksum.XXH3_128,
) -> bytes:
    """The length field and JSON header of a block file whose payloads follow in this order.

    `labels` (JSON values, e.g. model_key, tokens) are recorded for `kvtier store ls`. The
    payloads' checksums must be `algorithm`'s, which the header names and uses for its own.
    """
    header: dict[str, object] = {}
    described = {}
    offset = 0
    for item in payloads:
        size = len(item.data)
        stored = {"dtype": DTYPES[item.tensor.dtype], "shape": list(item.tensor.shape)}
        if item.codec is not Codec.RAW:
            stored = {"dtype": "U8", "shape": [size]}
        header[item.name] = {**stored, "data_offsets": [offset, offset + size]}
        described[item.name] = {
            "dtype": DTYPES[item.tensor.dtype],
            "shape": list(item.tensor.shape),
            "codec": item.codec.value,
            "raw_bytes": item.tensor.nbytes,
            "checksum": item.checksum,
        }
        offset += size
    meta = {
        "format_version": FORMAT_VERSION,
        "block_id": block_id,
        "fingerprint": fingerprint,
        "parent_id": parent_id or "",
        "tensors": json.dumps(described, separators=(",", ":")),
        "checksum_algorithm": algorithm.value,
    }
    header["__metadata__"] = {**meta, "metadata_checksum": _metadata_checksum(meta, algorithm)}
    if labels:
        text = json.dumps(dict(labels), separators=(",", ":"), sort_keys=True)
        header["__metadata__"] |= {"labels": text, "labels_checksum": algorithm.of(text.encode())}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    return struct.pack("<Q", len(text)) + text


_SLOT = re.compile(r"kvtierslot(\w+?)x")  # a slot's marker: letters JSON leaves as they are


class HeaderTemplate:
    """build_header's bytes for blocks of one layout (raw tensors of fixed names, dtypes and
    shapes; one fingerprint, labels and algorithm), made by filling the ids and checksums into
    text laid out once: ~18 us a block where build_header's four json.dumps took ~85 (2-core dev
    box). `build` returns None for what it does not cover (other tensors, ids JSON would escape):
    use build_header then. tests/test_disk.py checks the bytes are build_header's.
    """

    def __init__(
        self,
        fingerprint: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        labels: Mapping[str, object] | None = None,
        algorithm: Checksum = Checksum.XXH3_128,
    ) -> None:
        self.algorithm = algorithm
        self._dtypes = [t.dtype for t in tensors.values()]
        self._shapes = [tuple(t.shape) for t in tensors.values()]
        self._plain = _plain(fingerprint)
        # The slots' values, in build's order: block id, parent id, checksums, metadata checksum.
        order = ["b", "p", *(f"c{i}" for i in range(len(tensors))), "m"]
        slots = [
            Payload(name, t, Codec.RAW, _Sized(t.nbytes), f"kvtierslotc{i}x")
            for i, (name, t) in enumerate(tensors.items())
        ]
        # build_header with slots for the ids and checksums; its metadata checksum's slot is
        # found by that checksum's value (an xxh3-128 or sha256 hex digest: it occurs once).
        text = build_header(
            "kvtierslotbx", fingerprint, "kvtierslotpx", slots, labels=labels, algorithm=algorithm
        )
        text = text[8:].rstrip(b" ").decode()  # length and padding are redone at build
        meta = json.loads(text)["__metadata__"]
        self._header = _Slotted(text.replace(meta["metadata_checksum"], "kvtierslotmx"), order)
        covered = json.dumps([meta[key] for key in _CHECKED_METADATA[FORMAT_VERSION]])
        self._covered = _Slotted(covered, order[:-1])
        # Each slot once (labels or a fingerprint that look like a slot: build_header's turn).
        self._plain &= sorted(self._header.names) == sorted(order)
        self._plain &= sorted(self._covered.names) == sorted(order[:-1])

    def build(
        self,
        block_id: str,
        parent_id: str | None,
        tensors: Sequence[torch.Tensor],
        checksums: Sequence[str],
    ) -> bytes | None:
        """The header of block `block_id` whose tensors, in the template's order, have these
        checksums (the template's algorithm's); None when build_header must make it."""
        parent_id = parent_id or ""
        if (
            not self._plain
            or [t.dtype for t in tensors] != self._dtypes
            or [t.shape for t in tensors] != self._shapes
            or not all(map(_plain, checksums))
            or not _plain(block_id)
            or not (_plain(parent_id) or not parent_id)
        ):
            return None
        values = [block_id, parent_id, *checksums, ""]
        values[-1] = self.algorithm.of(self._covered.fill(values).encode())
        text = self._header.fill(values).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text


class _Sized:
    """A stand-in payload of `nbytes` bytes (build_header needs only its length)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes


class _Slotted:
    """Text with slots (`kvtierslot<name>x`) to fill: a %-format, and where in `order` (the
    values `fill` is given) each slot's value is."""

    def __init__(self, text: str, order: list[str]) -> None:
        pieces = _SLOT.split(text)  # odd pieces are slot names
        self.format = "%s".join(piece.replace("%", "%%") for piece in pieces[::2])
        self.names = pieces[1::2]  # in the text's order
        self._positions = [order.index(name) if name in order else 0 for name in self.names]

    def fill(self, values: Sequence[str]) -> str:
        return self.format % tuple([values[i] for i in self._positions])


def _plain(text: str) -> bool:
    """Whether JSON writes `text` as it is, also inside a JSON string (ids and hex digests)."""
    return text.isascii() and text.isalnum()


def read_header(file: BinaryIO, file_bytes: int, block_id: str, fingerprint: str | None) -> Header:
    """Read and check the header of an open block file; `Corrupt` if it is not a valid block
    `block_id` of model `fingerprint` (None: any model) exactly `file_bytes` long."""
    if file_bytes < 8:
        raise Corrupt("truncated file", f"{file_bytes} bytes")
    length_field = bytearray(8)
    _read(file, 0, length_field)
    (header_bytes,) = struct.unpack("<Q", length_field)
    if header_bytes > min(MAX_HEADER_BYTES, file_bytes - 8):
        raise Corrupt("truncated file", f"header of {header_bytes} bytes in {file_bytes}")
    text = bytearray(header_bytes)
    _read(file, 8, text)
    try:
        header = json.loads(text)
        return parse_header(header, 8 + header_bytes, file_bytes, block_id, fingerprint)
    except Corrupt:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise Corrupt("unparsable header", repr(error)) from error


def parse_header(
    header: dict, data_start: int, file_bytes: int, block_id: str, fingerprint: str | None
) -> Header:
    """Check a block file's header against itself, its name and the file size; `Corrupt` if not.

    Format 1 files (blake2b-128) are read as well as this format's; any other format_version is
    `Corrupt` ("unsupported format"): a newer kvtier wrote it, or the header is damaged.
    """
    meta = header.pop("__metadata__")
    version = meta["format_version"]
    if version not in READABLE_FORMATS:
        raise Corrupt(
            "unsupported format",
            f"format_version {version!r}; this kvtier reads {', '.join(READABLE_FORMATS)}",
        )
    algorithm = Checksum.BLAKE2B_128 if version == "1" else _algorithm(meta["checksum_algorithm"])
    if meta["metadata_checksum"] != _metadata_checksum(meta, algorithm):
        raise Corrupt("metadata checksum mismatch", "the header's metadata changed after writing")
    if meta["block_id"] != block_id or fingerprint not in (None, meta["fingerprint"]):
        raise Corrupt("foreign block", "block id or model fingerprint differ from the file name")
    labels = _labels(meta, algorithm)
    entries = _entries(header, json.loads(meta["tensors"]), data_start, file_bytes)
    return Header(entries, meta["fingerprint"], meta["parent_id"], labels, version, algorithm)


def _algorithm(name: object) -> Checksum:
    try:
        return Checksum(name)
    except ValueError:
        raise Corrupt("unsupported format", f"checksum_algorithm {name!r}") from None


def _labels(meta: Mapping[str, str], algorithm: Checksum) -> dict[str, object]:
    text, recorded = meta.get("labels"), meta.get("labels_checksum")
    if text is None and recorded is None:
        return {}
    if not isinstance(text, str) or recorded != algorithm.of(text.encode()):
        raise Corrupt("metadata checksum mismatch", "the header's labels changed after writing")
    labels = json.loads(text)
    if not isinstance(labels, dict):
        raise ValueError(f"labels {text!r} are not a JSON object")
    return labels


def _entries(header: dict, described: dict, data_start: int, file_bytes: int) -> dict[str, Entry]:
    """The tensors' entries, checked against their description and the file size."""
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
        entries[name] = Entry(
            dtype, shape, codec, raw_bytes, info["checksum"], data_start + begin, data_start + end
        )
        position = end
    if data_start + position != file_bytes:
        raise Corrupt("truncated file", f"{file_bytes} bytes, header needs {data_start + position}")
    return entries


def _metadata_checksum(meta: Mapping[str, str], algorithm: Checksum) -> str:
    """Checksum of every other metadata value (tensor checksums included)."""
    covered = _CHECKED_METADATA[meta["format_version"]]
    return algorithm.of(json.dumps([meta[key] for key in covered]).encode())


def _shape(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(dim) is int and dim >= 0 for dim in value):
        raise ValueError(f"shape {value!r} is not a list of sizes")
    return tuple(value)


def _read(file: BinaryIO, offset: int, buffer: object) -> None:
    try:
        read_exact_into(file, offset, buffer)
    except EOFError as error:
        raise Corrupt("truncated file", str(error)) from None
