"""Block files of format 1 (blake2b-128 checksums, no checksum_algorithm), written from that
format's spec rather than kvtier's code, for the tests of stores and servers that hold them.

Checked once against the files kvtier 0.1.0 (format 1) wrote: the same bytes for the same block.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

from kvtier.tiers.disk.format import DTYPES


def _blake2b(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def block_head(
    block_id: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    fingerprint: str,
    parent_id: str = "",
    labels: Mapping[str, object] | None = None,
) -> bytes:
    """The length field and JSON header of a format-1 file of raw `tensors` (in this order)."""
    header: dict[str, object] = {}
    described = {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.nbytes
        dtype, shape = DTYPES[tensor.dtype], list(tensor.shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        described[name] = {
            "dtype": dtype,
            "shape": shape,
            "codec": "raw",
            "raw_bytes": size,
            "checksum": _blake2b(_raw(tensor)),
        }
        offset += size
    meta = {
        "format_version": "1",
        "block_id": block_id,
        "fingerprint": fingerprint,
        "parent_id": parent_id,
        "tensors": json.dumps(described, separators=(",", ":")),
    }
    meta["metadata_checksum"] = _blake2b(json.dumps(list(meta.values())).encode())
    if labels:
        text = json.dumps(dict(labels), separators=(",", ":"), sort_keys=True)
        meta |= {"labels": text, "labels_checksum": _blake2b(text.encode())}
    header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def block_body(tensors: Mapping[str, torch.Tensor]) -> list[memoryview]:
    """The payloads that follow `block_head`'s header."""
    return [_raw(tensor) for tensor in tensors.values()]


def write_block(path: Path, block_id: str, tensors: Mapping[str, torch.Tensor], **head) -> Path:
    """Write a format-1 block file at `path` (its folders made); returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join([block_head(block_id, tensors, **head), *block_body(tensors)]))
    return path
