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
from kvtier.tiers.codec import Checksum, Codec, byte_view, decode_into, encode
from kvtier.tiers.disk.files import read_exact_into, read_views
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


# Raw payloads read with one preadv up to about this many bytes, then checked while they are
# in the core's cache (2-core box, 16 threads loading 32-layer blocks of 1 MiB layers from the
# page cache: 7.3-7.8 GB/s at 1 MiB, 7.2-7.4 reading the whole block first; 6.0 before: a seek
# and a read per layer).
READ_GROUP_BYTES = 1 << 20


def read_tensors(
    file: BinaryIO,
    block_id: str,
    header: Header,
    names: Iterable[str] | None,
    outs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode and verify tensors `names` (None: all) of an open block file, into `outs[name]`
    where given (contiguous CPU, same dtype and numel), else into new tensors.

    Raw payloads that lie back to back in the file come in READ_GROUP_BYTES at a time, one
    `preadv` into the tensors of a group (no seek, no read loop in Python), each checked just
    after its group is read. `Corrupt` when a payload fails;
    KVTierError when a name or an `out` does not fit the block.
    """
    entries = header.entries
    names = list(entries) if names is None else list(names)
    missing = [name for name in names if name not in entries]
    if missing:
        raise KVTierError(f"block {block_id} has no tensor {missing}; it holds {list(entries)}")
    result = {name: _out(block_id, name, entries[name], (outs or {}).get(name)) for name in names}
    order = sorted(names, key=lambda name: entries[name].begin)
    together = all(entries[name].codec is Codec.RAW for name in order) and all(
        entries[a].end == entries[b].begin for a, b in zip(order, order[1:], strict=False)
    )
    if not together:
        for name in names:
            _decode_entry_into(file, entries[name], result[name], header.algorithm)
        return result
    offset, group, grouped = entries[order[0]].begin, [], 0
    for index, name in enumerate(order):
        group.append((name, byte_view(result[name])))
        grouped += entries[name].raw_bytes
        if grouped < READ_GROUP_BYTES and index + 1 < len(order):
            continue
        try:  # read while its bytes are still in the core's cache, check, then the next group
            read_views(file.fileno(), offset, [view for _, view in group if len(view)])
        except EOFError as error:
            raise Corrupt("truncated file", str(error)) from None
        for name_, view in group:
            if header.algorithm.of(view) != entries[name_].checksum:
                raise Corrupt("checksum mismatch", f"tensor of {entries[name_].raw_bytes} bytes")
        offset, group, grouped = offset + grouped, [], 0
    return result


def _out(block_id: str, name: str, entry: Entry, out: torch.Tensor | None) -> torch.Tensor:
    """Where tensor `name` is read to: `out` once it fits the entry, else a new tensor."""
    if out is None:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if out.dtype != entry.dtype or out.numel() != math.prod(entry.shape):
        raise KVTierError(
            f"block {block_id} holds {name} as {entry.dtype} {list(entry.shape)} but `out` is "
            f"{out.dtype} {list(out.shape)}; pass a buffer of that dtype and size (is the "
            "store from another model or block layout?)"
        )
    if out.device.type != "cpu" or not out.is_contiguous():
        raise KVTierError(f"{name}: reads need a contiguous CPU `out` tensor")
    return out


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
