"""Sealed remote values: a header naming the key, a checksum and an optional HMAC, then the payload.

Turns bytes into a sealed value and back; it never talks to a server. A value that fails any
check reads as a miss (None), never as an exception: the remote tier is a cache.

Format, version 1 (all integers little-endian):

    offset    size  field
    0         4     magic        b"KVRV"
    4         1     version      1
    5         1     flags        bit 0: an HMAC follows the key; other bits must be 0
    6         2     key_bytes    K, length of the UTF-8 key (uint16)
    8         8     payload_len  N (uint64)
    16        16    checksum     blake2b-128 of the payload (of the head, when head-sealed)
    32        K     key          the key the value was sealed for, UTF-8
    32+K      32    hmac         if flags bit 0: HMAC-SHA256(hmac_key, value[0:32+K] || payload)
    32+K(+32) N     payload

The HMAC covers every header byte before it (magic, version, flags, lengths, checksum, key) and
the payload, so a server holding no HMAC key can neither forge a value nor move one to another
key. The checksum alone catches corruption, not malice: anyone can recompute it.

Head-sealed values (flags bit 1, `seal_head` / `open_head`) cover only the payload's first H
bytes, the head, which must vouch for the rest (the remote tier's head is a block file's header,
holding a checksum of every tensor: sha256 when signed, as an HMAC over xxh3 digests would not
vouch for the bytes): one hash pass over a large value instead of two or three,
and a reader can check the head and then read one tensor alone (a range read). After the key:

    32+K      8     head_len     H (uint64), covered by the checksum and the HMAC
    40+K      32    hmac         if flags bit 0: HMAC-SHA256(hmac_key, value[0:40+K] || head)
    40+K(+32) N     payload      head (H bytes) then the body (N - H bytes), not covered here
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAGIC = b"KVRV"
VERSION = 1
FLAG_HMAC = 0x01
FLAG_HEAD = 0x02
HMAC_BYTES = 32
_FIXED = struct.Struct("<4sBBHQ16s")  # magic, version, flags, key_bytes, payload_len, checksum
HEADER_BYTES = _FIXED.size  # 32, before the key
MAX_KEY_BYTES = 0xFFFF
_HEAD_LEN = struct.Struct("<Q")

Buffer = bytes | bytearray | memoryview


def seal(key: str, payload: Buffer, *, hmac_key: bytes | None = None) -> bytes:
    """Return header || payload for storing `payload` under `key`; signed when `hmac_key` is set.

    Copies the payload once (into the returned bytes); hashes it once, twice with an HMAC key.
    """
    key_bytes = key.encode()
    if len(key_bytes) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key_bytes)} bytes is longer than {MAX_KEY_BYTES}")
    payload = memoryview(payload).cast("B")
    flags = FLAG_HMAC if hmac_key is not None else 0
    digest = hashlib.blake2b(payload, digest_size=16).digest()
    header = _FIXED.pack(MAGIC, VERSION, flags, len(key_bytes), payload.nbytes, digest) + key_bytes
    if hmac_key is None:
        return b"".join((header, payload))
    mac = _mac(hmac_key, header, payload)
    return b"".join((header, mac, payload))


def open_value(
    key: str,
    value: Buffer,
    *,
    hmac_key: bytes | None = None,
    warned: set[str] | None = None,
) -> memoryview | None:
    """The payload of a value sealed for `key`, as a view into `value`; None if a check fails.

    None means: treat as a miss. Causes are a value sealed for another key, a bad checksum, a bad
    or missing HMAC (when `hmac_key` is set), a truncated value, an unknown magic or version.
    Each cause is logged at WARNING once per `warned` set (the caller owns it, one per tier), then
    at DEBUG; without a set every rejection is a warning. With `hmac_key` the HMAC is checked
    instead of the checksum; a signed value opened without one is checked by its checksum only.
    """
    view = memoryview(value).cast("B")
    cause = _check(key, view, hmac_key)
    if isinstance(cause, memoryview):
        return cause
    reject(key, cause, warned)
    return None


def reject(key: str, cause: str, warned: set[str] | None) -> None:
    """Log that the value of `key` was rejected for `cause`: a warning once per `warned` set."""
    first = warned is None or cause not in warned
    if warned is not None:
        warned.add(cause)
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "remote value for key %s rejected (%s); reading it as a miss",
        key,
        cause,
    )


def _check(key: str, view: memoryview, hmac_key: bytes | None) -> memoryview | str:
    """The payload view, or the cause (a short phrase) of the rejection."""
    if view.nbytes < HEADER_BYTES:
        return "truncated header"
    magic, version, flags, key_len, payload_len, digest = _FIXED.unpack_from(view)
    if magic != MAGIC:
        return "not a kvtier value"
    if version != VERSION:
        return f"unknown version {version}"
    if flags & FLAG_HEAD:
        return "head-sealed value (open it with open_head)"
    if flags & ~FLAG_HMAC:
        return f"unknown flags {flags:#x}"
    signed = bool(flags & FLAG_HMAC)
    key_end = HEADER_BYTES + key_len
    payload_start = key_end + (HMAC_BYTES if signed else 0)
    if view.nbytes < payload_start:
        return "truncated header"
    if view.nbytes != payload_start + payload_len:
        return "truncated" if view.nbytes < payload_start + payload_len else "trailing bytes"
    if view[HEADER_BYTES:key_end] != key.encode():
        # A value stored under another key: a server or client bug served the wrong block.
        return "sealed for another key"
    payload = view[payload_start:]
    if hmac_key is not None:
        if not signed:
            return "unsigned value while an HMAC key is set"
        expected = _mac(hmac_key, view[:key_end], payload)
        if not hmac.compare_digest(expected, view[key_end:payload_start]):
            return "bad HMAC"
        return payload  # the HMAC covers the payload: the checksum would add a pass, not safety
    if not hmac.compare_digest(hashlib.blake2b(payload, digest_size=16).digest(), digest):
        return "bad checksum"
    return payload


def _mac(hmac_key: bytes, header: Buffer, payload: memoryview) -> bytes:
    mac = hmac.new(hmac_key, header, hashlib.sha256)
    mac.update(payload)
    return mac.digest()


@dataclass(frozen=True, slots=True)
class OpenedHead:
    """A head-sealed value whose head passed its checks: the head (a view) and where the body is.

    The body is NOT checked here: the caller checks it against what the head says of it.
    """

    head: memoryview
    body_start: int  # offset of the body in the whole value
    body_bytes: int


def seal_head(
    key: str, head: Buffer, body: Sequence[Buffer], *, hmac_key: bytes | None = None
) -> bytes:
    """One value: a header sealing `head` only, then `head`, then the `body` buffers, which
    `head` must vouch for (e.g. hold their checksums). Copies every buffer once (into the
    returned bytes); `seal_head_parts` gives the same bytes without the copy."""
    return b"".join(seal_head_parts(key, head, body, hmac_key=hmac_key))


def seal_head_parts(
    key: str, head: Buffer, body: Sequence[Buffer], *, hmac_key: bytes | None = None
) -> list[Buffer]:
    """seal_head's value as buffers to send back to back: the seal and `head` joined (small),
    then the `body` buffers themselves (no copy: keep them unchanged until sent). Hashes only
    `head`: cost independent of the body's size."""
    key_bytes = key.encode()
    if len(key_bytes) > MAX_KEY_BYTES:
        raise ValueError(f"key of {len(key_bytes)} bytes is longer than {MAX_KEY_BYTES}")
    head = memoryview(head).cast("B")
    parts = [memoryview(part).cast("B") for part in body]
    payload_len = head.nbytes + sum(part.nbytes for part in parts)
    flags = FLAG_HEAD | (FLAG_HMAC if hmac_key is not None else 0)
    digest = hashlib.blake2b(head, digest_size=16).digest()
    fixed = _FIXED.pack(MAGIC, VERSION, flags, len(key_bytes), payload_len, digest)
    header = fixed + key_bytes + _HEAD_LEN.pack(head.nbytes)
    mac = [_mac(hmac_key, header, head)] if hmac_key is not None else []
    return [b"".join((header, *mac, head)), *parts]


def open_head(
    key: str,
    prefix: Buffer,
    *,
    value_bytes: int,
    hmac_key: bytes | None = None,
    warned: set[str] | None = None,
) -> OpenedHead | None:
    """Check a head-sealed value from its first bytes: `prefix` (the whole value, or at least
    through the head) of a value `value_bytes` long. None (a miss, logged as open_value does)
    for a value sealed for another key, a bad checksum or HMAC, an unsigned value while
    `hmac_key` is set, a wrong length, or a prefix that ends inside the head."""
    view = memoryview(prefix).cast("B")
    opened = check_head(key, view, value_bytes, hmac_key)
    if isinstance(opened, OpenedHead):
        return opened
    reject(key, opened, warned)
    return None


def check_head(
    key: str, view: memoryview, value_bytes: int, hmac_key: bytes | None
) -> OpenedHead | str:
    """open_head without the log: the opened head, or the cause of the rejection."""
    if view.nbytes < HEADER_BYTES:
        return "truncated header"
    magic, version, flags, key_len, payload_len, digest = _FIXED.unpack_from(view)
    if magic != MAGIC:
        return "not a kvtier value"
    if version != VERSION:
        return f"unknown version {version}"
    if not flags & FLAG_HEAD or flags & ~(FLAG_HMAC | FLAG_HEAD):
        return f"not a head-sealed value (flags {flags:#x})"
    key_end = HEADER_BYTES + key_len + _HEAD_LEN.size
    signed = bool(flags & FLAG_HMAC)
    payload_start = key_end + (HMAC_BYTES if signed else 0)
    if view.nbytes < key_end:
        return "truncated header"
    (head_len,) = _HEAD_LEN.unpack_from(view, key_end - _HEAD_LEN.size)
    if head_len > payload_len or value_bytes != payload_start + payload_len:
        return "truncated" if value_bytes < payload_start + payload_len else "wrong length"
    if view.nbytes < payload_start + head_len:
        return "truncated head"
    if view[HEADER_BYTES : key_end - _HEAD_LEN.size] != key.encode():
        return "sealed for another key"
    head = view[payload_start : payload_start + head_len]
    if hmac_key is not None:
        if not signed:
            return "unsigned value while an HMAC key is set"
        expected = _mac(hmac_key, view[:key_end], head)
        if not hmac.compare_digest(expected, view[key_end:payload_start]):
            return "bad HMAC"
    elif not hmac.compare_digest(hashlib.blake2b(head, digest_size=16).digest(), digest):
        return "bad checksum"
    return OpenedHead(head, payload_start + head_len, payload_len - head_len)
