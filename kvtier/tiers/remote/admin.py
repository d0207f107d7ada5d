"""`kvtier store ls|du|verify|gc|clear` for a remote tier: what a Valkey server holds for kvtier.

One function per command; each returns plain data for the CLI to print and touches only keys
under kvtier's prefixes (values.KEY_PREFIXES: this block format's and the older one's, whose
values it still checks and deletes). Walks keys with SCAN, reads heads with pipelined range
reads. Server problems raise RemoteError (these are admin calls, not the data path).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from kvtier.errors import RemoteError
from kvtier.tiers.remote.client import RemoteClient
from kvtier.tiers.remote.signing import FLAG_HMAC
from kvtier.tiers.remote.url import RemoteSpec
from kvtier.tiers.remote.values import KEY_PREFIXES, decode_tensor, heads_end, inspect, split_key

PROBE_BYTES = 64 << 10  # a first range read per key; a longer head is read again in full
BATCH = 256  # keys per pipelined round trip


@dataclass(frozen=True, slots=True)
class RemoteBlock:
    """One value under kvtier's prefix, as its heads describe it; `problem` None if they pass."""

    key: str
    fingerprint: str
    block_id: str
    model: str  # the writer's model_key, else the fingerprint
    tokens: int | None
    value_bytes: int
    raw_bytes: int
    signed: bool
    idle_s: int | None  # since the server last read or wrote it (None: unknown)
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class ModelTotal:
    model: str
    blocks: int
    tokens: int
    value_bytes: int
    least_idle_s: int | None


@dataclass(frozen=True, slots=True)
class Collected:
    removed_blocks: int
    freed_bytes: int
    used_bytes: int  # bytes of kvtier values left on the server


def connect(spec: RemoteSpec) -> RemoteClient:
    """A client for the admin calls; RemoteError (one line) if the server cannot be used."""
    return RemoteClient.connect(spec)


def list_blocks(client: RemoteClient, *, hmac_key: bytes | None = None) -> list[RemoteBlock]:
    """Every kvtier value on the server (every primary of a cluster), its heads checked (the
    HMAC too when `hmac_key` is given), sorted by model then block id."""
    keys = sorted(_scan(client))
    blocks = []
    for batch in _batches(keys):
        heads = _heads(client, batch)
        idle = client.idle_many(batch)
        for key, head, idle_s in zip(batch, heads, idle, strict=True):
            if head is not None:  # else deleted since the scan
                blocks.append(_describe(key, *head, idle_s, hmac_key))
    return sorted(blocks, key=lambda b: (b.model, b.block_id))


def by_model(blocks: Sequence[RemoteBlock]) -> list[ModelTotal]:
    """Totals per model, for `du`."""
    groups: dict[str, list[RemoteBlock]] = defaultdict(list)
    for block in blocks:
        groups[block.model].append(block)
    return [
        ModelTotal(
            model,
            len(group),
            sum(b.tokens or 0 for b in group),
            sum(b.value_bytes for b in group),
            min((b.idle_s for b in group if b.idle_s is not None), default=None),
        )
        for model, group in sorted(groups.items())
    ]


def used_memory_bytes(client: RemoteClient) -> int:
    """What the server (all primaries) uses in all, kvtier's values and anything else."""
    return client.used_memory_bytes()


def verify(
    client: RemoteClient, *, hmac_key: bytes | None = None, delete: bool = False
) -> tuple[int, list[RemoteBlock]]:
    """Read every kvtier value whole and check its heads and every tensor's checksum (and the
    HMAC with `hmac_key`): (values checked, the bad ones). `delete` removes the bad ones."""
    checked, bad, warned = 0, [], set()  # warn once per cause, not once per bad value
    for batch in _batches(sorted(_scan(client))):
        for key, value in zip(batch, _get_all(client, batch), strict=True):
            if value is None:
                continue
            checked += 1
            block = _describe(key, value, len(value), None, hmac_key)
            problem = block.problem or _payload_problem(key, block, value, hmac_key, warned)
            if problem:
                bad.append(_with_problem(block, problem))
    if delete and bad:
        client.delete_many([block.key for block in bad])
    return checked, bad


def collect(client: RemoteClient, *, max_bytes: int | None) -> Collected:
    """With `max_bytes`, delete the least recently used kvtier values (longest idle first)
    until the rest fit; without, delete nothing. The server's maxmemory policy and ttl_s
    evict on their own; this is for a shared server whose other users need room."""
    blocks = list_blocks(client)
    used = sum(block.value_bytes for block in blocks)
    if max_bytes is None or used <= max_bytes:
        return Collected(0, 0, used)
    victims, freed = [], 0
    for block in sorted(blocks, key=lambda b: -(b.idle_s if b.idle_s is not None else 2**62)):
        if used - freed <= max_bytes:
            break
        victims.append(block.key)
        freed += block.value_bytes
    client.delete_many(victims)
    return Collected(len(victims), freed, used - freed)


def clear(client: RemoteClient) -> int:
    """Delete every kvtier value (every model's); the number deleted. Other keys stay."""
    deleted = 0
    for batch in _batches(_scan(client)):
        deleted += client.delete_many(batch)
    return deleted


# -- reading heads -------------------------------------------------------------------------------


def _scan(client: RemoteClient) -> list[str]:
    return [key for prefix in KEY_PREFIXES for key in client.scan(prefix)]


def _batches(keys: Sequence[str]) -> Iterator[list[str]]:
    for start in range(0, len(keys), BATCH):
        yield list(keys[start : start + BATCH])


def _heads(client: RemoteClient, keys: list[str]) -> list[tuple[bytes, int] | None]:
    """Each value's bytes through its heads and its length; None for a key gone or unreadable."""
    found = client.prefix_many(keys, PROBE_BYTES)
    _failed(found, keys)
    heads: list[tuple[bytes, int] | None] = []
    for key, (prefix, value_bytes) in zip(keys, found, strict=True):
        need = heads_end(prefix)
        if value_bytes and need is not None and len(prefix) < need <= value_bytes:
            longer = client.prefix_many([key], need)[0]
            prefix = longer[0] if longer else prefix
        heads.append((prefix, value_bytes) if value_bytes else None)
    return heads


def _get_all(client: RemoteClient, keys: list[str]) -> list[bytes | None]:
    found = client.get_many(keys)
    lengths = client.length_many(keys)
    _failed(lengths, keys)
    return [value if length else None for value, length in zip(found, lengths, strict=True)]


def _failed(found: Sequence[object], keys: Sequence[str]) -> None:
    missing = [key for key, item in zip(keys, found, strict=True) if item is None]
    if missing:
        raise RemoteError(
            f"valkey did not answer for {len(missing)} keys (e.g. {missing[0]}); check every "
            "node is up, then run the command again"
        )


def _describe(
    key: str, prefix: bytes, value_bytes: int, idle_s: int | None, hmac_key: bytes | None
) -> RemoteBlock:
    names = split_key(key) or ("?", key.partition(":")[2].partition(":")[2])
    fingerprint, block_id = names
    signed = len(prefix) > 5 and bool(prefix[5] & FLAG_HMAC)
    found = inspect(key, block_id, prefix, value_bytes, fingerprint, hmac_key)
    base = RemoteBlock(
        key, fingerprint, block_id, fingerprint, None, value_bytes, 0, signed, idle_s
    )
    if isinstance(found, str):
        return _with_problem(base, found if split_key(key) else "not a kvtier block key")
    labels: Mapping[str, object] = found.header.labels
    tokens = labels.get("tokens")
    return RemoteBlock(
        key,
        fingerprint,
        block_id,
        str(labels.get("model_key") or fingerprint),
        tokens if isinstance(tokens, int) else None,
        value_bytes,
        found.header.raw_bytes,
        signed,
        idle_s,
    )


def _payload_problem(
    key: str, block: RemoteBlock, value: bytes, hmac_key: bytes | None, warned: set[str]
) -> str | None:
    found = inspect(key, block.block_id, value, len(value), block.fingerprint, hmac_key)
    if isinstance(found, str):
        return found
    view = memoryview(value)
    for name, entry in found.header.entries.items():
        start, end = found.span(name)
        out = torch.empty(entry.shape, dtype=entry.dtype)
        if not decode_tensor(key, found, name, view[start:end], out, warned=warned):
            return f"tensor {name} fails its checksum"
    return None


def _with_problem(block: RemoteBlock, problem: str) -> RemoteBlock:
    fields = {name: getattr(block, name) for name in RemoteBlock.__dataclass_fields__}
    return RemoteBlock(**(fields | {"problem": problem}))
