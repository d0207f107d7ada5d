"""Remote block values: a disk block file's bytes (tiers/disk/format.py), head-sealed for a key.

    value = seal header (signing.py, flags HEAD [| HMAC]) || block file header || tensor payloads

The seal covers the block file's header, which holds a checksum of every tensor's raw bytes
and of itself; each tensor is checked against its checksum when it is decoded. So a read hashes
each byte once, and one layer can be read alone (a range read after the heads). The checksums
are xxh3-128 (integrity at memory speed), or sha256 when the value is signed: xxh3 is not
collision resistant, so an HMAC over a header of xxh3 digests would not vouch for the bytes.
Pure functions of bytes and tensors; no server, no state.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from kvtier.blocks import FORMAT_VERSION, READABLE_FORMATS
from kvtier.errors import StoreCorruptError
from kvtier.tiers.codec import Checksum, Codec, decode_into, encode
from kvtier.tiers.disk.format import (
    Corrupt,
    Header,
    HeaderTemplate,
    Payload,
    build_header,
    parse_header,
)
from kvtier.tiers.remote.signing import (
    FLAG_HEAD,
    FLAG_HMAC,
    HEADER_BYTES,
    HMAC_BYTES,
    OpenedHead,
    check_head,
    reject,
    seal_head_parts,
)

# then <model fingerprint>:<block id>. Keys name the block format, so a kvtier that cannot read
# a value never sees it (an older `kvtier store verify --delete` leaves newer values alone).
KEY_PREFIX = f"kvtier:{FORMAT_VERSION}:"
KEY_PREFIXES = tuple(f"kvtier:{version}:" for version in READABLE_FORMATS)  # `kvtier store`'s
_LENGTH = struct.Struct("<Q")


def block_key(fingerprint: str, block_id: str) -> str:
    """The server key of one block of one model: models never share a key."""
    return f"{KEY_PREFIX}{fingerprint}:{block_id}"


def split_key(key: str) -> tuple[str, str] | None:
    """(fingerprint, block id) of a server key block_key made, by this kvtier or for a format it
    still reads (KEY_PREFIXES); None for any other key."""
    prefix = next((p for p in KEY_PREFIXES if key.startswith(p)), None)
    if prefix is None:
        return None
    fingerprint, sep, block_id = key[len(prefix) :].partition(":")
    return (fingerprint, block_id) if sep and fingerprint and block_id else None


def encode_value(
    key: str,
    block_id: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    fingerprint: str,
    parent_id: str | None,
    labels: Mapping[str, object],
    hmac_key: bytes | None = None,
    hash_map: Callable[..., Iterable[str]] = map,
    template: HeaderTemplate | None = None,
) -> list[bytes | memoryview]:
    """The value of block `block_id` under server key `key`, as buffers to send back to back:
    the heads, then each tensor's own memory (no copy: send them before the tensors change).
    Raw tensors: no codec (lz4 runs at 0.3-0.6 GB/s a thread, slower than the network it would
    spare).

    Checksums are xxh3-128, or sha256 with `hmac_key` (`signed_checksum`). `hash_map(hash,
    tensors)` computes them, in order: the builtin `map`, or a thread pool's (hashlib and
    xxhash release the GIL, so the tensors hash on several cores); the bytes are a block file
    as `encode_block` writes one to disk. `template`, made for `fingerprint` and `labels`,
    writes the block header faster (the same bytes); a block it does not cover gets
    build_header's.
    """
    algorithm = signed_checksum(hmac_key)
    views = [encode(tensor, Codec.RAW) for tensor in tensors.values()]  # the raw bytes, in place
    digests = list(hash_map(algorithm.of, views))
    head = None
    if template is not None and template.algorithm is algorithm:
        head = template.build(block_id, parent_id, list(tensors.values()), digests)
    if head is None:
        payloads = [
            Payload(name, tensor, Codec.RAW, view, digest)
            for (name, tensor), view, digest in zip(tensors.items(), views, digests, strict=True)
        ]
        head = build_header(
            block_id, fingerprint, parent_id, payloads, labels=labels, algorithm=algorithm
        )
    return seal_head_parts(key, head, views, hmac_key=hmac_key)


def signed_checksum(hmac_key: bytes | None) -> Checksum:
    """The tensors' checksum of a value: sha256 when it is signed, so the HMAC over the header
    covers the bytes through a collision-resistant hash; else xxh3-128 (integrity only)."""
    return Checksum.SHA256 if hmac_key is not None else Checksum.XXH3_128


def head_bound(block_id: str, tensors: Mapping[str, torch.Tensor], key: str) -> int:
    """Bytes from a value's start that surely hold both heads, for values of tensors shaped like
    `tensors` (a probe reads this many). Generous: labels and ids may grow a little."""
    payloads = [Payload(name, t, Codec.RAW, b"", "0" * 64) for name, t in tensors.items()]
    labels = {"model_key": "m" * 256, "tokens": 2**31}
    head = build_header(
        block_id, "f" * 64, "p" * 64, payloads, labels=labels, algorithm=Checksum.SHA256
    )
    return 40 + len(key.encode()) + 32 + len(head) + 1024


def heads_end(prefix: bytes | memoryview) -> int | None:
    """Where a head-sealed value's heads end, from its first bytes (enough of them to hold the
    seal's fixed header and key); None if `prefix` is not a head-sealed value's start."""
    view = memoryview(prefix).cast("B")
    if view.nbytes < HEADER_BYTES or not view[5] & FLAG_HEAD:
        return None
    (key_len,) = struct.unpack_from("<H", view, 6)
    length_at = HEADER_BYTES + key_len
    if view.nbytes < length_at + _LENGTH.size:
        return length_at + _LENGTH.size  # read this much, then ask again
    (head_len,) = _LENGTH.unpack_from(view, length_at)
    return length_at + _LENGTH.size + (HMAC_BYTES if view[5] & FLAG_HMAC else 0) + head_len


@dataclass(frozen=True, slots=True)
class Located:
    """A value whose heads passed every check: the block header and where its file starts."""

    header: Header
    block_start: int  # offset of the block file's byte 0 in the value
    value_bytes: int

    def span(self, name: str) -> tuple[int, int]:
        """[start, end) of tensor `name`'s payload in the value."""
        entry = self.header.entries[name]
        return self.block_start + entry.begin, self.block_start + entry.end


def locate(
    key: str,
    block_id: str,
    prefix: bytes | memoryview,
    *,
    value_bytes: int,
    fingerprint: str,
    hmac_key: bytes | None,
    warned: set[str] | None,
) -> Located | None:
    """Check the seal and the block header of a value from its first bytes; None (a miss,
    warned once per cause) if it is not block `block_id` of model `fingerprint` under `key`."""
    found = inspect(key, block_id, prefix, value_bytes, fingerprint, hmac_key)
    if isinstance(found, str):
        reject(key, found, warned)
        return None
    return found


def inspect(
    key: str,
    block_id: str,
    prefix: bytes | memoryview,
    value_bytes: int,
    fingerprint: str,
    hmac_key: bytes | None,
) -> Located | str:
    """locate without the log: the located block, or the cause of the rejection."""
    opened = check_head(key, memoryview(prefix).cast("B"), value_bytes, hmac_key)
    if isinstance(opened, str):
        return opened
    try:
        header = _block_header(opened, block_id, fingerprint)
    except Corrupt as error:
        return error.cause
    except (ValueError, KeyError, TypeError, AttributeError, struct.error):
        return "unparsable block header"
    if hmac_key is not None and not header.algorithm.cryptographic:
        # Only a key holder signs, and kvtier signs sha256 headers; refuse the rest anyway: an
        # HMAC over xxh3 digests would let other bytes with the same digests through.
        return f"signed value checksummed with {header.algorithm.value} (not collision resistant)"
    return Located(header, opened.body_start - opened.head.nbytes, value_bytes)


def _block_header(opened: OpenedHead, block_id: str, fingerprint: str) -> Header:
    head = opened.head
    (length,) = _LENGTH.unpack_from(head)
    if length != head.nbytes - _LENGTH.size:
        raise Corrupt("unparsable block header", f"length field {length} in {head.nbytes}")
    header = json.loads(bytes(head[_LENGTH.size :]))
    file_bytes = head.nbytes + opened.body_bytes
    return parse_header(header, head.nbytes, file_bytes, block_id, fingerprint)


def decode_tensor(
    key: str,
    located: Located,
    name: str,
    payload: bytes | memoryview,
    out: torch.Tensor,
    *,
    warned: set[str] | None,
) -> bool:
    """Decode tensor `name` from its `payload` bytes into `out` and check its checksum; False
    (warned once per cause) when the bytes or `out`'s layout do not match the header."""
    entry = located.header.entries.get(name)
    if entry is None or out.dtype != entry.dtype or out.numel() != math.prod(entry.shape):
        reject(key, "block layout differs from this cache's", warned)
        return False
    try:
        decode_into(payload, entry.codec, out)
    except StoreCorruptError:
        reject(key, "undecodable payload", warned)
        return False
    if located.header.algorithm.of(out) != entry.checksum:
        reject(key, "tensor checksum mismatch", warned)
        return False
    return True
