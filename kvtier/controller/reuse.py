"""Prefix reuse: the longest chain of a prompt's blocks some store holds, loaded into a controller.

It looks in the process's other live controllers (their GPU, host and disk copies, through
controller/index.py), then this controller's disk store (the shared area that earlier runs and
other processes persisted), then the remote server; costs.py decides how much of the chain to
load; the blocks go into the fastest tier with room (a disk block may also stay on disk,
adopted) in rounds, as many at once as there is room for: a round's disk blocks are read
whole on the mover's I/O threads, all in flight together, while its remote run comes in one
`RemoteTier.load_blocks` call (pipelined MGETs). A block that fails to load (missing, or
failing verification: the store quarantines it) ends the prefix there and the caller computes
the rest. Sealed blocks only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.blocks import BlockMeta, Tier, block_id
from kvtier.controller import calibration
from kvtier.controller.costs import (
    PAGE_CACHE,
    Choice,
    PrefillFlops,
    Source,
    assumed_prefill_flops,
    bandwidths,
    choose,
)
from kvtier.controller.index import INDEX
from kvtier.controller.lost import reason
from kvtier.controller.persist import persisted_by
from kvtier.layout import KVGeometry
from kvtier.machine import device_name
from kvtier.measured import prefill_key, read_learned
from kvtier.tiers.base import Endpoint, Handle
from kvtier.transfer import Lane

log = logging.getLogger(__name__)

# Bounce-buffer bytes one round may take (pinned host memory, for stored blocks headed to a CUDA
# GPU slot): a long prefix loads in rounds of about this much instead of pinning all at once.
BOUNCE_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class Found:
    """One block of the prompt's chain that a store holds: where, and whose store it is."""

    block_id: str
    tier: Tier
    handle: Handle
    owner: Any = None  # another controller whose copy it is; None: this controller's store
    cached: bool = False  # a disk block whose file the page cache holds (memory speed)

    @property
    def source(self) -> Source:
        """Where the cost model's load figures for it come from."""
        return PAGE_CACHE if self.cached else self.tier


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
    for key in chain:  # a stored file is opened, not read (verified when loaded); whether
        if key in held:  # the page cache holds it: a few 4 KiB reads that must not wait
            found.append(held[key])
        elif disk is not None and (cached := disk.page_cached(key)) is not None:
            found.append(Found(key, Tier.DISK, key, cached=cached))
        else:
            break
    rest = chain[len(found) :]
    if remote is not None and rest:
        found += [Found(key, Tier.REMOTE, key) for key in rest[: remote.stored_prefix(rest)]]
    return found


def load_prefix(
    controller: Any, token_ids: torch.Tensor, *, max_blocks: int, flops: PrefillFlops
) -> int:
    """Load the longest stored prefix of `token_ids` `[batch, tokens]` (at most `max_blocks`
    blocks) into an empty controller when that beats computing it (the model's `flops`); the
    positions loaded. `stats()["reuse"]` records the decision, its reason and the predictions."""
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
    choice, load_scale = _choose(controller, found, flops)
    started = time.perf_counter()
    chosen = found[: choice.blocks]
    landed, failure = _load_chain(controller, chosen, rows)
    loaded = [(controller.table[index], item) for index, item in enumerate(chosen[:landed])]
    controller.tokens = len(loaded) * g.block_tokens
    controller.counters.prefix_hit_tokens += controller.tokens
    _after_load(controller, loaded)
    controller.counters.reuse = _record(choice, found, loaded, failure, started, g.block_tokens)
    if loaded and failure is None and landed == len(chosen):  # the cost model learns from it
        calibration.record(
            device_name(g.devices[0]),
            choice,
            [item.source for item in chosen],
            loaded_bytes=len(chosen) * g.block_bytes,
            load_s=controller.counters.reuse["load_s"],
            scales=load_scale,
        )
    return controller.tokens


def _choose(
    controller: Any, found: list[Found], flops: PrefillFlops
) -> tuple[Choice, dict[Source, float]]:
    """The choice, and the load calibration per tier it scaled the predictions by."""
    g = controller.geometry
    cuda = any(device.type == "cuda" for device in g.devices)
    remote = controller.stores.get(Tier.REMOTE)
    device = device_name(g.devices[0])
    measured, rate_source = INDEX.prefill_flops(controller.fingerprint), "measured in this process"
    # the fastest any process timed on this machine: a new process has timed a warm-up at most
    saved = read_learned("prefill", prefill_key(device, controller.fingerprint))
    if saved is not None and saved[0] > (measured or 0.0):
        measured, rate_source = saved[0], f"measured here on {saved[1]}"
    load_scale = calibration.load_scales(device)
    choice = choose(
        [item.source for item in found],
        block_bytes=g.block_bytes,
        block_tokens=g.block_tokens,
        bandwidth=bandwidths(
            cuda=cuda,
            layer_bytes=g.layer_block_bytes,
            disk_path=controller.cfg.disk.path,
            remote_spec=remote.spec if remote is not None else None,
        ),
        flops=flops,
        flops_per_s=measured or assumed_prefill_flops(cuda=cuda),
        rate_source=rate_source if measured else "assumed",
        batch=g.batch,
        load_scale=load_scale,
    )
    return choice, load_scale


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


def _load_chain(
    controller: Any, items: list[Found], rows: list[list[int]]
) -> tuple[int, str | None]:
    """Append the chain's blocks `items` to the table in rounds: each round finds room for as
    many as the tiers have room for at once (all of them but under memory pressure) and loads
    them together (`_land`); how many landed, and why the rest did not (None: all did).

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


@dataclass(frozen=True, slots=True)
class Room:
    """A block of the chain appended to the table, where its copy goes (no slot set until its
    bytes are in), and where it comes from."""

    block: BlockMeta
    tier: Tier
    handle: Handle
    item: Found

    @property
    def adopted(self) -> bool:
        """The shared disk file itself is the copy: nothing to load (only disk rooms are)."""
        return self.tier is Tier.DISK

    @property
    def from_store(self) -> bool:
        """Its bytes are read from a serialized store (a disk file, the server) into host
        memory; else, unless adopted, copied from another cache's GPU or host slot."""
        return not self.adopted and self.item.tier in (Tier.DISK, Tier.REMOTE)


def _rooms(controller: Any, items: list[Found], rows: list[list[int]]) -> list[Room]:
    """Append `items` to the table, each with a room, until one finds none (it is truncated
    again) or the round's bounce buffers reach BOUNCE_BYTES.

    A memory room first (demoting landed blocks, as a prefill does); a block of this store's
    disk takes its shared file as its copy (adopted) only in a round that found memory room for
    none so far, since only then did moving every landed block make none; else the round ends,
    and the next one can move this round's blocks once they landed.
    """
    cuda = any(device.type == "cuda" for device in controller.geometry.devices)
    rooms: list[Room] = []
    bounce_bytes = 0
    for item in items:
        block = _append_sealed(controller, item, rows)
        tier, handle = _memory_room(controller, block)
        if tier is None and all(room.adopted for room in rooms):
            tier, handle = Tier.DISK, _adopt(controller, item)
        if handle is None:
            controller.table.truncate(block.index)
            break
        rooms.append(Room(block, tier, handle, item))
        if cuda and tier is Tier.GPU and rooms[-1].from_store:  # read into a pinned bounce buffer
            bounce_bytes += controller.geometry.block_bytes
            if bounce_bytes >= BOUNCE_BYTES:
                break
    return rooms


def _land(controller: Any, rooms: list[Room]) -> tuple[int, str | None]:
    """Load the blocks of `rooms` into their rooms together (`_fetch`); how many landed (the
    first missing or failing block and those after it are freed and truncated), and why not
    all did. A landed block gets its slot; a GPU slot's bounce buffers go up in one ticket."""
    table, g, stores = controller.table, controller.geometry, controller.stores
    targets = [
        None
        if room.adopted
        else stores[room.tier].block_target(room.handle, parent_id=table.parent_id(room.block))
        for room in rooms
    ]
    landing, results = _fetch(controller, rooms, targets)
    landed = next((i for i, result in enumerate(results) if not result), len(results))
    failure = None
    if landed < len(results):
        item, why = rooms[landed].item, reason(results[landed])
        source = item.tier.name.lower()
        log.warning(
            "prefix reuse: %s block %s %s; computing from there", source, item.block_id, why
        )
        failure = f"{source} block {item.block_id} {why}"
    uploads = [
        (layers, targets[i])
        for i, layers in landing.items()
        if i < landed and layers[0] is not targets[i][0]
    ]
    if uploads:
        controller.mover.finish(controller.mover.submit(uploads, lane=Lane.NOW))
    for room in rooms[landed:]:
        stores[room.tier].free(room.handle)
    if landed < len(rooms):
        table.truncate(rooms[landed].block.index)
    counters = controller.counters
    for room in rooms[:landed]:
        room.block.slots[room.tier] = room.handle
        if room.adopted:
            continue
        counters.tiers[room.tier].bytes_written += g.block_bytes
        if room.item.owner is None:
            counters.tiers[room.item.tier].bytes_read += g.block_bytes
    return landed, failure


def _fetch(
    controller: Any, rooms: list[Room], targets: list[Any]
) -> tuple[dict[int, tuple[torch.Tensor, ...]], list[object]]:
    """Bring the bytes of every room in: the landing layers of each block read (by room index;
    the target itself where it is host memory) and each room's result (falsy: missing or
    failing verification, a ReadResult).

    Disk blocks (this store's, or another cache's disk copies) are read whole on the mover's
    I/O threads, all queued at once; another cache's GPU and host copies go in one mover
    ticket and the remote blocks come in one `RemoteTier.load_blocks` call meanwhile.
    """
    mover = controller.mover
    landing = {
        i: tuple(_landing(view) for view in targets[i])
        for i, room in enumerate(rooms)
        if room.from_store
    }
    disk = [i for i in landing if rooms[i].item.tier is Tier.DISK]
    remote = [i for i in landing if rooms[i].item.tier is Tier.REMOTE]
    reads = mover.submit_reads([(_source(controller, rooms[i].item), landing[i]) for i in disk])
    copies = [
        (_source(controller, room.item), targets[i])
        for i, room in enumerate(rooms)
        if not room.adopted and not room.from_store
    ]
    if copies:
        mover.finish(mover.submit(copies, lane=Lane.NOW))
    results: list[object] = [True] * len(rooms)
    if remote:
        keys = [rooms[i].item.block_id for i in remote]
        loaded = controller.stores[Tier.REMOTE].load_blocks(keys, [landing[i] for i in remote])
        for i, result in zip(remote, loaded, strict=True):
            results[i] = result
    mover.finish(reads)
    for i, result in zip(disk, reads.read_results(), strict=True):
        results[i] = result
    return landing, results


def _source(controller: Any, item: Found) -> Endpoint:
    """Every layer of the block `item` names, in its owner's store (this controller's if none):
    a `Stored` block, or another cache's GPU or host slot views."""
    owner = item.owner or controller
    return owner.stores[item.tier].block_source(item.handle)


def _landing(view: torch.Tensor) -> torch.Tensor:
    """Where a stored layer lands: the slot itself when it is a contiguous CPU view, else a
    bounce buffer (pinned when the slot is on a GPU) that the mover copies up."""
    if view.device.type == "cpu" and view.is_contiguous():
        return view
    return torch.empty(view.shape, dtype=view.dtype, pin_memory=view.device.type == "cuda")


def _memory_room(controller: Any, block: BlockMeta) -> tuple[Tier | None, Handle | None]:
    """Room in the fastest memory tier that can make it (demoting landed blocks, as a prefill
    does), or (None, None)."""
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
    return None, None


def _adopt(controller: Any, item: Found) -> Handle | None:
    """The shared disk file of a block this controller's store found, held as its disk copy
    (pinned against GC, within the disk budget), or None."""
    disk = controller.stores.get(Tier.DISK)
    if disk is None or item.tier is not Tier.DISK or item.owner is not None:
        return None
    return disk.adopt(item.block_id)


def _after_load(controller: Any, loaded: list[tuple[BlockMeta, Found]]) -> None:
    """Bookkeeping once the prefix is in: access counts, reuse hits, persist write-through of
    blocks the persistent stores do not hold yet, a fresh placement version."""
    placement = controller.placement
    queued = []
    for block, item in loaded:
        block.access_count += 1
        INDEX.hit(block.block_id)
        skip = persisted_by(controller, item.owner)
        if item.tier is Tier.REMOTE:
            skip.add(Tier.REMOTE)
        if item.tier is Tier.DISK and item.owner is None:
            skip.add(Tier.DISK)  # read from the shared area: persisted already
        if placement.persist.add([block], skip=frozenset(skip)):
            queued.append(block)
    if placement.persist.needs_host and queued:
        placement.seal(queued)  # host copies for the persist saves
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
