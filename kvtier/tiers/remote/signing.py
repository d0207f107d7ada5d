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
    16        16    checksum     blake2b-128 of the payload (the disk store's checksum)
    32        K     key          the key the value was sealed for, UTF-8
    32+K      32    hmac         if flags bit 0: HMAC-SHA256(hmac_key, value[0:32+K] || payload)
    32+K(+32) N     payload

The HMAC covers every header byte before it (magic, version, flags, lengths, checksum, key) and
the payload, so a server holding no HMAC key can neither forge a value nor move one to another
key. The checksum alone catches corruption, not malice: anyone can recompute it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct

log = logging.getLogger(__name__)

MAGIC = b"KVRV"
VERSION = 1
FLAG_HMAC = 0x01
HMAC_BYTES = 32
_FIXED = struct.Struct("<4sBBHQ16s")  # magic, version, flags, key_bytes, payload_len, checksum
HEADER_BYTES = _FIXED.size  # 32, before the key
MAX_KEY_BYTES = 0xFFFF

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
    first = warned is None or cause not in warned
    if warned is not None:
        warned.add(cause)
    log.log(
        logging.WARNING if first else logging.DEBUG,
        "remote value for key %s rejected (%s); reading it as a miss",
        key,
        cause,
    )
    return None


def _check(key: str, view: memoryview, hmac_key: bytes | None) -> memoryview | str:
    """The payload view, or the cause (a short phrase) of the rejection."""
    if view.nbytes < HEADER_BYTES:
        return "truncated header"
    magic, version, flags, key_len, payload_len, digest = _FIXED.unpack_from(view)
    if magic != MAGIC:
        return "not a kvtier value"
    if version != VERSION:
        return f"unknown version {version}"
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
