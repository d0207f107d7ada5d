"""One block file's bytes: the checked inputs and encoded buffers of a write, and the verified
decode of an open file's tensors. Pure functions of tensors and open files: no paths, no state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import numpy as np
import torch

from kvtier.errors import KVTierError, StoreCorruptError
from kvtier.tiers.codec import Checksum, Codec, decode_into, encode
from kvtier.tiers.disk.files import read_exact_into
from kvtier.tiers.disk.format import DTYPES, Corrupt, Entry, Header, Payload, build_header


def check_tensors(block_id: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """KVTierError, with the fix, for tensors that cannot be stored as they are."""
    if not tensors:
        raise KVTierError(f"block {block_id} has no tensors; write at least one")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise KVTierError(f"tensor name {name!r} is not usable; use names like 'l0.k'")
        if tensor.dtype not in DTYPES:
            raise KVTierError(f"{name}: dtype {tensor.dtype} cannot be stored; cast it first")
        if not tensor.is_cpu or not tensor.is_contiguous():
            raise KVTierError(f"{name}: pass a contiguous CPU tensor (`.contiguous().cpu()`)")


def encode_block(
    block_id: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    codec: Codec,
    fingerprint: str,
    parent_id: str | None,
    labels: Mapping[str, object],
) -> list[bytes | memoryview]:
    """The buffers of the block's file, header first; they may share memory with `tensors`.
    Tensors are checksummed with xxh3-128: the disk store guards against accidents (torn
    writes, flipped bits), not against someone who can write its files."""
    payloads = [
        Payload(name, tensor, codec, encode(tensor, codec), Checksum.XXH3_128.of(tensor))
        for name, tensor in tensors.items()
    ]
    head = build_header(block_id, fingerprint, parent_id, payloads, labels=labels)
    return [head, *(item.data for item in payloads)]


def read_tensors(
    file: BinaryIO,
    block_id: str,
    header: Header,
    names: Iterable[str] | None,
    outs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode and verify tensors `names` (None: all) of an open block file, into `outs[name]`
    where given (contiguous CPU, same dtype and numel), else into new tensors.

    `Corrupt` when a payload fails; KVTierError when a name or an `out` does not fit the block.
    """
    entries = header.entries
    names = list(entries) if names is None else list(names)
    missing = [name for name in names if name not in entries]
    if missing:
        raise KVTierError(f"block {block_id} has no tensor {missing}; it holds {list(entries)}")
    result = {}
    for name in names:
        entry = entries[name]
        out = (outs or {}).get(name)
        if out is None:
            out = torch.empty(entry.shape, dtype=entry.dtype)
        elif out.dtype != entry.dtype or out.numel() != math.prod(entry.shape):
            raise KVTierError(
                f"block {block_id} holds {name} as {entry.dtype} {list(entry.shape)} but `out` is "
                f"{out.dtype} {list(out.shape)}; pass a buffer of that dtype and size (is the "
                "store from another model or block layout?)"
            )
        elif out.device.type != "cpu" or not out.is_contiguous():
            raise KVTierError(f"{name}: reads need a contiguous CPU `out` tensor")
        _decode_entry_into(file, entry, out, header.algorithm)
        result[name] = out
    return result


def bytes_read(header: Header, names: Iterable[str]) -> int:
    """Bytes a read of `names` took from the file: the header and those payloads."""
    return header.data_start + sum(
        header.entries[name].end - header.entries[name].begin for name in names
    )


def _decode_entry_into(
    file: BinaryIO, entry: Entry, out: torch.Tensor, algorithm: Checksum
) -> None:
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
    except Corrupt:
        raise
    except StoreCorruptError as error:
        raise Corrupt("undecodable payload", str(error)) from error
    if algorithm.of(out) != entry.checksum:
        raise Corrupt("checksum mismatch", f"tensor of {entry.raw_bytes} bytes")
