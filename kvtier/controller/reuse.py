"""Prefix reuse: the longest chain of a prompt's blocks some store holds, loaded into a controller.

It looks in the process's other live controllers (their GPU, host and disk copies, through
controller/index.py), then this controller's disk store (the shared area that earlier runs and
other processes persisted), then the remote server; costs.py decides how much of the chain to
load; each block is copied into the fastest tier with room (a disk block may also stay on disk,
adopted), one mover ticket per block, except the chain's remote run, which comes in one
`RemoteTier.load_blocks` call (pipelined MGETs; more only when memory runs short). A block
that fails to load (missing, or failing verification: the store quarantines it) ends the
prefix there and the caller computes the rest. Sealed blocks only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.blocks import BlockMeta, Tier, block_id
from kvtier.controller.costs import Choice, assumed_prefill_rate, bandwidths, choose
from kvtier.controller.index import INDEX
from kvtier.controller.lost import reason
from kvtier.layout import KVGeometry
from kvtier.tiers.base import Handle
from kvtier.transfer import Lane

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Found:
    """One block of the prompt's chain that a store holds: where, and whose store it is."""

    block_id: str
    tier: Tier
    handle: Handle
    owner: Any = None  # another controller whose copy it is; None: this controller's store


def prompt_chain(rows: list[list[int]], *, block_tokens: int, blocks: int, fingerprint: str):
    """The ids the first `blocks` full blocks of a prompt get when sealed (rows: token ids per
    batch row), the same recipe as BlockTable.seal."""
    chain: list[str] = []
    parent = None
    for index in range(blocks):
        start = index * block_tokens
        flat = [t for row in rows for t in row[start : start + block_tokens]]
        parent = block_id(parent, flat, fingerprint)
        chain.append(parent)
    return chain


def _same_layout(a: KVGeometry, b: KVGeometry) -> bool:
    return (a.block_tokens, a.batch, a.token_shape, a.dtype, a.layer_ids) == (
        b.block_tokens,
        b.batch,
        b.token_shape,
        b.dtype,
        b.layer_ids,
    )


def find_prefix(controller: Any, chain: list[str]) -> list[Found]:
    """The longest run of `chain`, from its first id, that some store holds: another live
    controller's copies first (its fastest), then this one's disk store, then the remote."""
    held: dict[str, Found] = {}
    for other in INDEX.controllers(controller.fingerprint):
        if other is controller or not _same_layout(other.geometry, controller.geometry):
            continue
        for block in other.table:
            if not block.sealed or not block.slots or block.block_id in held:
                continue
            tier = block.fastest_tier()
            held[block.block_id] = Found(block.block_id, tier, block.slots[tier], other)
    disk, remote = controller.stores.get(Tier.DISK), controller.stores.get(Tier.REMOTE)
    found: list[Found] = []
    for key in chain:
        if key in held:
            found.append(held[key])
        elif disk is not None and disk.probe(key):
            found.append(Found(key, Tier.DISK, key))
        else:
            break
    rest = chain[len(found) :]
    if remote is not None and rest:
        found += [Found(key, Tier.REMOTE, key) for key in rest[: remote.stored_prefix(rest)]]
    return found


def load_prefix(
    controller: Any, token_ids: torch.Tensor, *, max_blocks: int, flops_per_token: float
) -> int:
    """Load the longest stored prefix of `token_ids` `[batch, tokens]` (at most `max_blocks`
    blocks) into an empty controller when that beats computing it; the positions loaded.
    `stats()["reuse"]` records the decision, its reason and the predictions."""
    assert controller.tokens == 0 and not len(controller.table), "reuse needs an empty cache"
    g = controller.geometry
    rows = token_ids.tolist()
    chain = prompt_chain(
        rows, block_tokens=g.block_tokens, blocks=max_blocks, fingerprint=controller.fingerprint
    )
    found = find_prefix(controller, chain) if chain else []
    if not found:
        controller.counters.reuse = {"decision": "none", "reason": "no stored block of the prompt"}
        return 0
    choice = _choose(controller, found, flops_per_token)
    started = time.perf_counter()
    loaded: list[tuple[BlockMeta, Found]] = []
    failure = None
    chosen = found[: choice.blocks]
    local = [item for item in chosen if item.tier is not Tier.REMOTE]  # find_prefix: remote last
    for item in local:
        failure = _load_one(controller, item, rows)
        if failure is not None:
            break
        loaded.append((controller.table[len(loaded)], item))
    if failure is None and len(chosen) > len(local):
        remote = chosen[len(local) :]
        landed, failure = _load_remote(controller, remote, rows)
        loaded += [
            (controller.table[len(loaded) + i], item) for i, item in enumerate(remote[:landed])
        ]
    controller.tokens = len(loaded) * g.block_tokens
    controller.counters.prefix_hit_tokens += controller.tokens
    _after_load(controller, loaded)
    controller.counters.reuse = _record(choice, found, loaded, failure, started, g.block_tokens)
    return controller.tokens


def _choose(controller: Any, found: list[Found], flops_per_token: float) -> Choice:
    g = controller.geometry
    cuda = any(device.type == "cuda" for device in g.devices)
    remote = controller.stores.get(Tier.REMOTE)
    remote_gbps = remote.stats().get("load_gbps") if remote is not None else None
    measured = INDEX.prefill_rate(controller.fingerprint)
    rate = measured or assumed_prefill_rate(flops_per_token=flops_per_token, cuda=cuda)
    return choose(
        [item.tier for item in found],
        block_bytes=g.block_bytes,
        block_tokens=g.block_tokens,
        bandwidth=bandwidths(
            cuda=cuda,
            layer_bytes=g.layer_block_bytes,
            disk_path=controller.cfg.disk.path,
            remote_gbps=remote_gbps,
            remote_spec=remote.spec if remote is not None else None,
        ),
        prefill_rate=rate,
        rate_source="measured in this process" if measured else "assumed",
    )


def _load_one(controller: Any, item: Found, rows: list[list[int]]) -> str | None:
    """Append block `item` to the table with a copy in the fastest tier with room; None when
    it landed, else why not (the table is left as before)."""
    table = controller.table
    block = _append_sealed(controller, item, rows)
    tier, handle = _room(controller, block, item)
    if tier is None:
        table.truncate(block.index)
        return "no room in the GPU, host or disk tier"
    if tier is Tier.DISK and item.owner is None and item.tier is Tier.DISK:
        block.slots[tier] = handle  # adopted: the shared file is this block's copy
        return None
    owner = item.owner or controller
    stores = controller.stores
    copy = (
        owner.stores[item.tier].block_source(item.handle),
        stores[tier].block_target(handle, parent_id=table.parent_id(block)),
    )
    ticket = controller.mover.submit([copy], lane=Lane.NOW)
    if not controller.mover.finish(ticket):
        failures = ticket.failures()
        stores[tier].free(handle)
        table.truncate(block.index)
        why = reason(failures[0][1]) if failures else "could not be read"
        log.warning(
            "prefix reuse: %s block %s %s; computing from there",
            item.tier.name.lower(),
            item.block_id,
            why,
        )
        return f"{item.tier.name.lower()} block {item.block_id} {why}"
    block.slots[tier] = handle
    counters = controller.counters
    counters.tiers[tier].bytes_written += controller.geometry.block_bytes
    if item.owner is None:
        counters.tiers[item.tier].bytes_read += controller.geometry.block_bytes
    return None


def _append_sealed(controller: Any, item: Found, rows: list[list[int]]) -> BlockMeta:
    """The next block of the prompt, appended to the table and sealed: it must be `item`."""
    table, bt = controller.table, controller.geometry.block_tokens
    block = table.open_block()
    start = block.index * bt
    block.extend_ids([row[start : start + bt] for row in rows])
    block.tokens = bt
    table.seal(block, controller.fingerprint)
    assert block.block_id == item.block_id, "a block sealed from the prompt has another id"
    return block


def _load_remote(
    controller: Any, items: list[Found], rows: list[list[int]]
) -> tuple[int, str | None]:
    """Append the remote blocks `items` (the chain's last run) to the table, as many per
    `RemoteTier.load_blocks` call as the memory tiers have room for at once (all of them but
    under memory pressure); how many landed, and why the rest did not (None: all did).

    A block gets its slot in the table only once its bytes are in, so making room for a later
    block never moves one that has not landed; when room runs out, the blocks found room for
    are loaded, and the next round can move them down (as a prefill does) to make more.
    """
    landed = 0
    while landed < len(items):
        rooms = _rooms(controller, items[landed:], rows)
        if not rooms:  # not even after moving every landed block it could
            return landed, "no room in the GPU, host or disk tier"
        count, failure = _land(controller, rooms)
        landed += count
        if failure is not None:
            return landed, failure
    return landed, None


def _rooms(
    controller: Any, items: list[Found], rows: list[list[int]]
) -> list[tuple[BlockMeta, Tier, Handle]]:
    """Append `items` to the table, each with room in a memory tier (no slot set yet), until
    one finds none (it is truncated again)."""
    rooms = []
    for item in items:
        block = _append_sealed(controller, item, rows)
        tier, handle = _room(controller, block, item)
        if tier is None:
            controller.table.truncate(block.index)
            break
        rooms.append((block, tier, handle))
    return rooms


def _land(controller: Any, rooms: list[tuple[BlockMeta, Tier, Handle]]) -> tuple[int, str | None]:
    """Load the remote blocks of `rooms` into their rooms with one load_blocks call; how many
    landed (the first missing or failing block and those after it are freed and truncated),
    and why not all did.

    Host slots are the CPU tensors it fills; a GPU slot gets a bounce buffer (pinned on CUDA)
    that one mover ticket copies up.
    """
    table, g, stores = controller.table, controller.geometry, controller.stores
    targets = [
        stores[tier].block_target(handle, parent_id=table.parent_id(block))
        for block, tier, handle in rooms
    ]
    landing = [tuple(_landing(view) for view in target) for target in targets]
    keys = [block.block_id for block, _, _ in rooms]
    results = stores[Tier.REMOTE].load_blocks(keys, landing)
    landed = next((i for i, result in enumerate(results) if not result), len(results))
    failure = None
    if landed < len(results):
        why = reason(results[landed])
        log.warning("prefix reuse: remote block %s %s; computing from there", keys[landed], why)
        failure = f"remote block {keys[landed]} {why}"
    uploads = [
        (landing[i], targets[i]) for i in range(landed) if landing[i][0] is not targets[i][0]
    ]
    if uploads:
        controller.mover.finish(controller.mover.submit(uploads, lane=Lane.NOW))
    for _, tier, handle in rooms[landed:]:
        stores[tier].free(handle)
    if landed < len(rooms):
        table.truncate(rooms[landed][0].index)
    counters = controller.counters
    for block, tier, handle in rooms[:landed]:
        block.slots[tier] = handle
        counters.tiers[tier].bytes_written += g.block_bytes
        counters.tiers[Tier.REMOTE].bytes_read += g.block_bytes
    return landed, failure


def _landing(view: torch.Tensor) -> torch.Tensor:
    """Where a remote layer lands: the slot itself when it is a contiguous CPU view, else a
    bounce buffer (pinned when the slot is on a GPU) that the mover copies up."""
    if view.device.type == "cpu" and view.is_contiguous():
        return view
    return torch.empty(view.shape, dtype=view.dtype, pin_memory=view.device.type == "cuda")


def _room(controller: Any, block: BlockMeta, item: Found) -> tuple[Tier | None, Handle | None]:
    """A copy's home: the fastest memory tier that can make room (demoting earlier blocks, as
    a prefill does), else the shared disk file itself when the block comes from this store."""
    placement = controller.placement
    for tier in placement.order:
        if not controller.stores[tier].holds_open_blocks:
            break
        handle = placement.allocate(
            tier,
            block,
            protected=frozenset({block.index}),
            seq_tokens=block.index * controller.geometry.block_tokens,
            required=False,
        )
        if handle is not None:
            return tier, handle
    disk = controller.stores.get(Tier.DISK)
    if disk is not None and item.tier is Tier.DISK and item.owner is None:
        handle = disk.adopt(item.block_id)
        if handle is not None:
            return Tier.DISK, handle
    return None, None


def _after_load(controller: Any, loaded: list[tuple[BlockMeta, Found]]) -> None:
    """Bookkeeping once the prefix is in: access counts, reuse hits, persist write-through of
    blocks the persistent stores do not hold yet, a fresh placement version."""
    placement = controller.placement
    for block, item in loaded:
        block.access_count += 1
        INDEX.hit(block.block_id)
        skip = {Tier.REMOTE} if item.tier is Tier.REMOTE else set()
        if item.tier is Tier.DISK and item.owner is None:
            skip.add(Tier.DISK)  # read from the shared area: persisted already
        placement.persist.add([block], skip=frozenset(skip))
    if placement.persist.needs_host:
        placement.seal([block for block, _ in loaded])  # host copies for the persist saves
    placement.persist.pump()
    controller._invalidate()


def _record(
    choice: Choice,
    found: list[Found],
    loaded: list[tuple[BlockMeta, Found]],
    failure: str | None,
    started: float,
    block_tokens: int,
) -> dict:
    sources = {tier.name.lower(): 0 for tier in Tier}
    for _, item in loaded:
        sources[item.tier.name.lower()] += 1
    return {
        "decision": choice.decision,
        "reason": choice.reason if failure is None else f"{choice.reason}; stopped: {failure}",
        "predicted_load_s": round(choice.predicted_load_s, 6),
        "predicted_recompute_s": round(choice.predicted_recompute_s, 6),
        "load_s": round(time.perf_counter() - started, 6) if loaded else 0.0,
        "stored_tokens": len(found) * block_tokens,
        "loaded_tokens": len(loaded) * block_tokens,
        "loaded_blocks": sources,
    }
