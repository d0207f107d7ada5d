"""TierController: decides where every KV block lives and plans each layer's gather.

It appends K/V per layer, seals full blocks (write-through to host), keeps every tier within
its budget by demoting policy victims (GPU -> host -> disk), promotes into free room, and
assembles each layer's full, position-ordered K/V in a staging buffer ("prefetch", then
"gather"). Tiers store and the mover copies; only this module decides.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch

from .blocks import BlockMeta, BlockTable, Tier, block_id
from .config import Config
from .errors import BudgetError, KVTierError, StoreCorruptError
from .policy import make_policy
from .tiers.disk import DiskStore
from .tiers.gpu import GpuPool, StagingRing
from .tiers.host import HostPool
from .tiers.pool import SlotLayout
from .transfer import Copy, DiskRead, Mover, Ticket

log = logging.getLogger(__name__)

# keep this many free GPU slots for new blocks before promoting streamed blocks into GPU slots,
# so a promotion is not undone by the next block to seal
PROMOTE_RESERVE_SLOTS = 2
PROMOTE_PER_STEP = 4


@dataclass(frozen=True, slots=True)
class KVShape:
    """What the controller needs to know of the model's tiered layers."""

    layer_ids: tuple[int, ...]  # model layer index of each tiered layer
    layer_devices: tuple[torch.device, ...]
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass
class _Step:
    start: int  # committed tokens when the step began
    new: int  # tokens this step appends
    blocks: list[BlockMeta]  # blocks receiving the new tokens, in order
    layers_done: int = 0
    new_kv: list[torch.Tensor] = field(default_factory=list)  # per layer, when batched


@dataclass
class _TierCounters:
    bytes_written: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass
class _Prefetch:
    ticket: Ticket
    key: tuple[int, int]  # (epoch, committed tokens) it was planned for


@dataclass
class _Counters:
    tiers: dict[Tier, _TierCounters] = field(
        default_factory=lambda: {t: _TierCounters() for t in Tier}
    )
    gathers: int = 0
    sync_gathers: int = 0
    promotions: int = 0
    demotions: int = 0
    gather_s: float = 0.0


class TierController:
    """Owns the block table, the three tiers and the mover for one sequence (all batch rows)."""

    def __init__(
        self,
        cfg: Config,
        shape: KVShape,
        *,
        fingerprint: str,
        mover: Mover | None = None,
        store: DiskStore | None = None,
    ) -> None:
        self.cfg = cfg
        self.shape = shape
        self.fingerprint = fingerprint
        self.block_tokens = bt = cfg.block_tokens
        self.depth = cfg.policy.prefetch_depth
        layout = SlotLayout(
            shape.layer_devices, bt, shape.batch, shape.kv_heads, shape.head_dim, shape.dtype
        )
        host_layout = SlotLayout(
            (torch.device("cpu"),) * len(shape.layer_ids),
            bt,
            shape.batch,
            shape.kv_heads,
            shape.head_dim,
            shape.dtype,
        )
        self.layout = layout
        self.staging = StagingRing(layout, buffers=self.depth + 1)
        self.gpu_budget_bytes = cfg.gpu.budget_bytes
        self.gpu = GpuPool(layout, budget_bytes=cfg.gpu.budget_bytes)
        self.host = HostPool(host_layout, budget_bytes=cfg.host.budget_bytes)
        self.mover = mover or Mover()
        if store is None and cfg.disk.budget_bytes > 0:
            store = DiskStore(
                cfg.disk.path,
                budget_bytes=cfg.disk.budget_bytes,
                codec=cfg.disk.codec,
                fingerprint=fingerprint,
            )
        self.disk = store
        self.disk_budget_bytes = cfg.disk.budget_bytes if store is not None else 0
        self.policy = make_policy(cfg.policy, bt)
        self.table = BlockTable(bt)
        self.tokens = 0  # committed tokens, every tier
        self.step_count = 0
        self.epoch = 0
        self._step: _Step | None = None
        self._pending_ids: torch.Tensor | None = None
        self._prefetched: dict[int, _Prefetch] = {}
        self._plan: tuple[tuple, list[tuple[Tier, int, int, int, int]]] | None = None
        self._write_through: dict[int, Ticket] = {}  # block index -> in-flight D2H
        self._disk_writes: list[tuple[BlockMeta, object]] = []  # (block, future)
        self._step_writes: list[Ticket] = []  # this step's tokens going straight to host
        self.counters = _Counters()
        self._placement = 0  # bumped on every slot change; keys the cached gather views
        self._views: dict[int, tuple] = {}
        self._batched_writes = False
        self._open_views: dict[int, tuple] = {}
        self._check_minimum()

    # -- public API: the step cycle ------------------------------------------------------------
    def note_tokens(self, token_ids: torch.Tensor | None) -> None:
        """Token ids `[batch, q]` of the next append (from the model's pre-hook); they key ids."""
        self._pending_ids = None if token_ids is None else token_ids.detach().to("cpu")

    def begin_step(self, new_tokens: int) -> None:
        """Reserve GPU slots for `new_tokens` positions; done before the first tiered layer runs."""
        if self._step is not None:
            raise KVTierError("begin_step called twice without the step finishing")
        if new_tokens <= 0:
            raise KVTierError(f"a step must append at least one token, got {new_tokens}")
        ids = self._pending_ids
        self._pending_ids = None
        if ids is not None and ids.shape != (self.shape.batch, new_tokens):
            ids = None  # e.g. chunked inputs the hook could not see; fall back to anonymous ids
        end = self.tokens + new_tokens
        self._fit_staging(end)
        blocks: list[BlockMeta] = []
        pos = self.tokens
        while pos < end:
            block = self.table.open_block()
            if not block.slots:
                # a new block: GPU if room can be made, else straight to host (a long prefill
                # chunk demotes as it fills)
                try:
                    slot = self._allocate_gpu(reserve=len(blocks), required=False)
                    if slot is not None:
                        block.slots[Tier.GPU] = slot
                    else:
                        block.slots[Tier.HOST] = self._allocate_host()
                except KVTierError:
                    if not block.slots:
                        self.table.truncate(block.index)
                    raise
            take = min(self.block_tokens - block.tokens, end - pos)
            if block.token_ids is not None:
                if ids is None:
                    block.token_ids = None
                else:
                    chunk = ids[:, pos - self.tokens : pos - self.tokens + take].tolist()
                    if not block.token_ids:
                        block.token_ids = [[] for _ in range(self.shape.batch)]
                    for row, extra in zip(block.token_ids, chunk, strict=True):
                        row.extend(extra)
            block.tokens += take
            blocks.append(block)
            pos += take
        self._step = _Step(start=self.tokens, new=new_tokens, blocks=blocks)
        self._batched_writes = self.gpu.single_device and all(Tier.GPU in b.slots for b in blocks)

    def abort_step(self) -> None:
        """Undo a step whose forward failed midway: no half-written tokens stay behind."""
        step = self._step
        if step is None:
            return
        self._step = None
        for ticket in self._step_writes:
            self.mover.finish(ticket)
        self._step_writes.clear()
        bt = self.block_tokens
        for block in step.blocks:
            block.tokens = max(0, min(bt, step.start - block.index * bt))
            if block.token_ids:
                block.token_ids = [row[: block.tokens] for row in block.token_ids]
        keep = -(-step.start // bt)
        for block in self.table.truncate(keep):
            self._drop(block)
        self._invalidate()

    def prefetch(self, layer: int) -> None:
        """Start assembling tiered layer `layer`'s committed K/V in its staging buffer."""
        key = (self.epoch, self.tokens)
        current = self._prefetched.get(layer)
        if current is not None and current.key == key:
            return
        if current is not None:
            self.mover.finish(current.ticket)
        if self.tokens + 1 > self.staging.capacity_tokens:
            self._fit_staging(self.tokens + 1)
            key = (self.epoch, self.tokens)
        start = time.perf_counter()
        ticket = self._gather(layer)
        self.counters.gather_s += time.perf_counter() - start
        self._prefetched[layer] = _Prefetch(ticket, key)

    def append(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's K/V `[batch, kv_heads, q, head_dim]` for tiered layer `layer`.

        Returns the layer's full K and V `[batch, kv_heads, tokens, head_dim]` as strided views
        of its staging buffer: valid until the layer d+1 places later reuses that buffer.
        """
        if layer == 0 and self._step is None:
            self.begin_step(keys.shape[-2])
        step = self._step
        if step is None or keys.shape[-2] != step.new:
            raise KVTierError(
                f"tiered layer {layer} appended {keys.shape[-2]} tokens but the step expects "
                f"{None if step is None else step.new}; layers must be called in order"
            )
        if keys.shape[0] != self.shape.batch:
            raise KVTierError(
                f"batch size changed from {self.shape.batch} to {keys.shape[0]}; "
                "use a new TieredCache (or cache.reset()) for a new batch"
            )
        key = (self.epoch, self.tokens)
        prefetched = self._prefetched.pop(layer, None)
        if prefetched is not None and prefetched.key != key:
            self.mover.finish(prefetched.ticket)
            prefetched = None
        if prefetched is None:
            self.counters.sync_gathers += 1
            start = time.perf_counter()
            prefetched = _Prefetch(self._gather(layer), key)
            self.counters.gather_s += time.perf_counter() - start
        if not self.mover.wait(prefetched.ticket):
            raise StoreCorruptError(
                "a disk block failed its checksum while streaming; its tokens cannot be "
                "recomputed inside this cache. Re-run the prompt (the corrupt file is quarantined)"
            )
        stage = self.staging.buffer(layer)
        end = step.start + step.new
        # [q, batch, kv_heads, head_dim] token-major, K and V side by side like the slots
        new_kv = torch.stack((keys, values)).permute(3, 0, 1, 2, 4)
        stage[step.start : end].copy_(new_kv)
        if self._batched_writes:
            # GPU slots get every layer's new tokens in one copy at the end of the step
            step.new_kv.append(new_kv)
        else:
            self._write_new_tokens(step, layer, stage)
        self.counters.tiers[Tier.GPU].bytes_written += step.new * self.layout.token_bytes
        step.layers_done += 1
        if step.layers_done == len(self.shape.layer_ids):
            self._end_step()
        # [batch, kv_heads, tokens, head_dim] strided views of the token-major buffer
        b, h, d = self.shape.batch, self.shape.kv_heads, self.shape.head_dim
        size, stride = (b, h, end, d), (h * d, d, 2 * b * h * d, 1)
        offset = stage.storage_offset()
        return (
            torch.as_strided(stage, size, stride, offset),
            torch.as_strided(stage, size, stride, offset + b * h * d),
        )

    # -- public API: edits ---------------------------------------------------------------------
    def crop(self, tokens: int) -> None:
        """Keep the first `tokens` positions; a sealed block cut into becomes the open block."""
        if self._step is not None:
            raise KVTierError("crop called in the middle of a forward pass")
        tokens = max(0, min(tokens, self.tokens))
        if tokens == self.tokens:
            return
        self._finish_writes()
        bt = self.block_tokens
        keep_blocks = -(-tokens // bt)
        for block in self.table.truncate(keep_blocks):
            self._drop(block)
        self.tokens = tokens
        if keep_blocks and tokens % bt:
            block = self.table[keep_blocks - 1]
            if Tier.GPU not in block.slots and Tier.HOST not in block.slots:
                self._copy_block(block, Tier.HOST, self._allocate_host())
            # the block becomes the open one again: keep exactly one writable copy
            if Tier.GPU in block.slots and Tier.HOST in block.slots:
                self._free_copy(block, Tier.HOST)
            if Tier.DISK in block.slots:
                self._free_copy(block, Tier.DISK)
            if block.token_ids:
                block.token_ids = [row[: tokens % bt] for row in block.token_ids]
            block.tokens = tokens % bt
            block.block_id = None
        self._invalidate()

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder batch rows of every block in every tier (beam search)."""
        self._finish_writes()
        parent = None
        for block in self.table:
            for tier, slot in list(block.slots.items()):
                if tier is Tier.DISK:
                    continue
                pool = self.gpu if tier is Tier.GPU else self.host
                for layer in range(len(self.shape.layer_ids)):
                    view = pool.layer_view(slot, layer)
                    view.copy_(view.index_select(2, beam_idx.to(view.device)))
            if block.token_ids:
                order = beam_idx.tolist()
                block.token_ids = [list(block.token_ids[i]) for i in order]
            if block.sealed:
                old = block.block_id
                block.block_id = self._block_id(parent, block)
                if Tier.DISK in block.slots:
                    self._rewrite_disk(block, old, beam_idx)
            parent = block.block_id
        self._invalidate()

    def set_budget(self, tier: Tier, budget_bytes: int) -> None:
        """Change a tier's budget at run time, demoting whatever no longer fits.

        A budget that cannot work raises BudgetError and leaves the old budget in force.
        """
        if self._step is not None:
            raise KVTierError("set_budget called in the middle of a forward pass")
        self._finish_writes()
        if tier is Tier.GPU:
            self._set_gpu_budget(budget_bytes)
        elif tier is Tier.HOST:
            self._set_host_budget(budget_bytes)
        else:
            if self.disk is None:
                raise BudgetError("no disk tier: set disk.budget > 0 when creating the cache")
            if budget_bytes < self.disk.bytes_used:
                raise BudgetError(
                    f"disk budget {budget_bytes} bytes is below the {self.disk.bytes_used} bytes "
                    "of blocks stored only there; raise it or lower the context"
                )
            self.disk.budget_bytes = self.disk_budget_bytes = budget_bytes
        self._invalidate()

    def _set_gpu_budget(self, budget_bytes: int) -> None:
        old = self.gpu_budget_bytes
        self.gpu_budget_bytes = budget_bytes
        try:
            self._check_minimum()
            pool_budget = budget_bytes - self.staging.bytes_used
            if pool_budget < self.layout.slot_bytes:
                need = self.staging.bytes_used + self.layout.slot_bytes
                raise BudgetError(
                    f"gpu budget {budget_bytes} bytes cannot hold the {self.tokens} tokens held "
                    f"now: staging takes {self.staging.bytes_used} bytes; need at least {need}"
                )
        except BudgetError:
            self.gpu_budget_bytes = old
            raise
        old_pool = self.gpu.budget_bytes
        try:
            for slot in self.gpu.set_budget(pool_budget):
                block = next(b for b in self.table if b.slots.get(Tier.GPU) == slot)
                self._demote_gpu(block)
        except KVTierError:
            # blocks demoted so far stay demoted (consistently); the old budget stays in force
            self.gpu_budget_bytes = old
            self.gpu.set_budget(old_pool)
            raise
        self.gpu.release()

    def _set_host_budget(self, budget_bytes: int) -> None:
        if budget_bytes < self.host.layout.slot_bytes:
            raise BudgetError(
                f"host budget {budget_bytes} bytes is below one block "
                f"({self.host.layout.slot_bytes} bytes); the host tier needs at least that"
            )
        old = self.host.budget_bytes
        try:
            for slot in self.host.set_budget(budget_bytes):
                block = next(b for b in self.table if b.slots.get(Tier.HOST) == slot)
                self._evict_host(block, wait=False)
            self._finish_writes()
        except KVTierError:
            self._finish_writes()
            self.host.set_budget(old)
            raise
        self.host.release()

    def reset(self) -> None:
        """Drop every block in every tier (the store keeps files only when persist = true)."""
        self._finish_writes()
        for block in self.table.truncate(0):
            self._drop(block)
        self.tokens = 0
        self._step = None
        self._invalidate()

    def close(self) -> None:
        self.reset()
        self.gpu.close()
        self.host.close()
        self.staging.close()
        self.mover.close()

    # -- public API: stats ---------------------------------------------------------------------
    def stats(self) -> dict:
        def tier(t: Tier, pool_bytes: int, extra: dict) -> dict:
            c = self.counters.tiers[t]
            return {
                "bytes_used": pool_bytes,
                "blocks": sum(1 for b in self.table if t in b.slots),
                "bytes_written": c.bytes_written,
                "bytes_read": c.bytes_read,
                "io_ms": round(c.seconds * 1e3, 3),
                **extra,
            }

        disk_used = self.disk.bytes_used if self.disk else 0
        return {
            "gpu": tier(
                Tier.GPU,
                self.gpu.bytes_used + self.staging.bytes_used,
                {
                    "budget_bytes": self.gpu_budget_bytes,
                    "staging_bytes": self.staging.bytes_used,
                    "slot_bytes": self.gpu.bytes_used,
                },
            ),
            "host": tier(
                Tier.HOST,
                self.host.bytes_used,
                {"budget_bytes": self.host.budget_bytes, "pinned_bytes": self.host.pinned_bytes},
            ),
            "disk": tier(
                Tier.DISK,
                disk_used,
                {
                    "budget_bytes": self.disk_budget_bytes,
                    "codec": self.disk.stats().get("codec") if self.disk else None,
                },
            ),
            "tokens": self.tokens,
            "blocks": len(self.table),
            "block_tokens": self.block_tokens,
            "block_bytes": self.layout.slot_bytes,
            "steps": self.step_count,
            "timings": {
                "gather_ms": round(self.counters.gather_s * 1e3, 3),
                "gathers": self.counters.gathers,
                "sync_gathers": self.counters.sync_gathers,
                "promotions": self.counters.promotions,
                "demotions": self.counters.demotions,
            },
            "transfer": self.mover.stats(),
        }

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests; cheap enough for debugging runs)."""
        for block in self.table:
            assert block.slots, f"block {block.index} is in no tier"
            if Tier.DISK in block.slots:
                assert block.sealed and self.disk is not None and self.disk.contains(block.block_id)
        assert self.gpu.bytes_used + self.staging.bytes_used <= self.gpu_budget_bytes
        assert self.host.bytes_used <= self.host.budget_bytes
        if self.disk is not None:
            assert self.disk.bytes_used <= self.disk_budget_bytes
        for tier, pool in ((Tier.GPU, self.gpu), (Tier.HOST, self.host)):
            slots = [b.slots[tier] for b in self.table if tier in b.slots]
            assert len(slots) == len(set(slots)) == pool.used_slots, f"{tier.name} slot leak"

    def read_block(self, index: int, layer: int) -> torch.Tensor:
        """Copy of one block's committed `[tokens, 2, batch, kv_heads, head_dim]` for one layer."""
        block = self.table[index]
        stage = torch.empty((self.block_tokens, *self.layout.token_shape), dtype=self.shape.dtype)
        self._read_copy(block, block.fastest_tier(), layer, stage)
        return stage[: min(self.block_tokens, self.tokens - index * self.block_tokens)]

    # -- placement -----------------------------------------------------------------------------
    def _check_minimum(self) -> None:
        bt = self.block_tokens
        chunk_blocks = -(-self.cfg.prefill_chunk_tokens // bt) + 1
        pinned = -(-self.cfg.policy.sink_tokens // bt) + -(-self.cfg.policy.recent_tokens // bt)
        if self.cfg.policy.name != "sink_recent":
            pinned = 0
        need = self.staging.bytes_for(bt) + (chunk_blocks + pinned) * self.layout.slot_bytes
        if self.gpu_budget_bytes < need:
            raise BudgetError(
                f"gpu budget {self.gpu_budget_bytes} bytes is too small: staging plus one "
                f"prefill chunk of {self.cfg.prefill_chunk_tokens} tokens and the pinned sink/"
                f"recent blocks need at least {need} bytes; raise gpu.budget or lower "
                "prefill_chunk_tokens / block_tokens / policy.recent_tokens"
            )
        self.host.require(1, "one block")

    def _fit_staging(self, tokens: int) -> None:
        """Grow staging to `tokens` positions, shrinking the slot pool to keep within budget.

        Grows with 1/8 headroom when that costs no resident block, so decode does not
        reallocate staging (and drop its prefetches) at every block boundary.
        """
        if tokens <= self.staging.capacity_tokens:
            return
        step_blocks = len(self._step.blocks) if self._step else 1
        resident = self.gpu.used_slots * self.layout.slot_bytes
        roomy = tokens + tokens // 8
        if self.gpu_budget_bytes - self.staging.bytes_for(roomy) >= resident:
            tokens = roomy
        staging = self.staging.bytes_for(tokens)
        pool_budget = self.gpu_budget_bytes - staging
        if pool_budget < step_blocks * self.layout.slot_bytes:
            need = staging + step_blocks * self.layout.slot_bytes
            raise BudgetError(
                f"gpu budget {self.gpu_budget_bytes} bytes cannot hold {tokens} tokens: staging "
                f"alone takes {staging} bytes; need at least {need} bytes (raise gpu.budget, "
                "lower policy.prefetch_depth, or use a smaller context)"
            )
        for slot in self.gpu.set_budget(pool_budget):
            block = next(b for b in self.table if b.slots.get(Tier.GPU) == slot)
            self._demote_gpu(block)
        self.gpu.release()
        if self.staging.ensure(tokens):
            self._invalidate()

    def _allocate_gpu(self, reserve: int, *, required: bool = True) -> int | None:
        slot = self.gpu.allocate()
        while slot is None:
            protected = {b.index for b in self._step.blocks} if self._step else set()
            candidates = [
                b
                for b in self.table
                if Tier.GPU in b.slots and b.sealed and b.index not in protected
            ]
            victims = self.policy.victims(candidates, 1, self.tokens)
            if not victims and not required:
                return None
            if not victims:
                raise BudgetError(
                    f"gpu budget {self.gpu_budget_bytes} bytes holds only "
                    f"{self.gpu.used_slots} blocks here, all pinned or in use by this step; "
                    f"need room for {reserve + 1} more blocks of {self.layout.slot_bytes} "
                    "bytes: raise gpu.budget or lower policy.recent_tokens / sink_tokens"
                )
            self._demote_gpu(victims[0])
            slot = self.gpu.allocate()
        self._invalidate_plan()
        return slot

    def _demote_gpu(self, block: BlockMeta) -> None:
        """Drop a block's GPU copy, first making sure a slower tier holds it."""
        ticket = self._write_through.pop(block.index, None)
        if ticket is not None:
            self.mover.finish(ticket)
        if Tier.HOST not in block.slots and Tier.DISK not in block.slots:
            slot = self._allocate_host()
            self._copy_block(block, Tier.HOST, slot)
        self._free_copy(block, Tier.GPU)
        self.counters.demotions += 1

    def _allocate_host(self) -> int:
        """A free host slot, evicting by policy to disk when the host tier is full."""
        self._reap_disk_writes()
        slot = self.host.allocate()
        while slot is None:
            if self._disk_writes:
                self._reap_disk_writes(wait=True)
                slot = self.host.allocate()
                continue
            victim = self._host_victim()
            if victim is None:
                raise BudgetError(
                    f"host budget {self.host.budget_bytes} bytes is full and no block can move "
                    f"to disk ({'no disk tier' if self.disk is None else 'blocks are unsealed'}); "
                    f"raise host.budget (each block is {self.layout.slot_bytes} bytes) or "
                    "disk.budget"
                )
            self._evict_host(victim, wait=False)
            slot = self.host.allocate()
        self._invalidate_plan()
        return slot

    def _host_victim(self) -> BlockMeta | None:
        # a host copy of a GPU-resident block is free to drop; otherwise it must go to disk
        self._reap_write_through()
        pending = {id(b) for b, _ in self._disk_writes}
        on_host = [
            b
            for b in self.table
            if Tier.HOST in b.slots and id(b) not in pending and b.index not in self._write_through
        ]
        redundant = [b for b in on_host if Tier.GPU in b.slots or Tier.DISK in b.slots]
        if redundant:
            # GPU pins say nothing about host copies: plain policy order here
            return min(redundant, key=self.policy.sort_key)
        if self.disk is None:
            return None
        sealed = [b for b in on_host if b.sealed]
        victims = sorted(sealed, key=self.policy.sort_key)
        return victims[0] if victims else None

    def _evict_host(self, block: BlockMeta, *, wait: bool) -> None:
        if Tier.GPU in block.slots or Tier.DISK in block.slots:
            self._free_copy(block, Tier.HOST)
            return
        if self.disk is None:
            raise BudgetError(
                "host tier must shrink but a block has nowhere to go: enable the disk tier "
                "(disk.budget > 0) or keep host.budget larger"
            )
        if not block.sealed:
            raise BudgetError(
                f"host tier must shrink but block {block.index} is still filling (only full "
                "blocks can go to disk); keep host.budget at least "
                f"{self.host.bytes_used} bytes until it fills, or lower it later"
            )
        tensors = {
            f"l{lid}.kv": self.host.layer_view(block.slots[Tier.HOST], i)
            for i, lid in enumerate(self.shape.layer_ids)
        }
        parent = self.table[block.index - 1].block_id if block.index else None
        future = self.mover.submit(self._timed_write, block.block_id, tensors, parent)
        self._disk_writes.append((block, future))
        if wait:
            self._reap_disk_writes(wait=True)

    def _timed_write(self, bid: str, tensors: dict, parent: str | None) -> int:
        start = time.perf_counter()
        written = self.disk.write_block(bid, tensors, parent_id=parent)
        self.counters.tiers[Tier.DISK].seconds += time.perf_counter() - start
        return written

    def _reap_disk_writes(self, wait: bool = False) -> None:
        """Settle finished disk writes (and the oldest one, if `wait`): their host slots free up.

        A failed write (disk full, I/O error) is dropped from the queue and raised; its block
        keeps its host copy, so nothing is lost.
        """
        keep, failure = [], None
        for i, (block, future) in enumerate(self._disk_writes):
            if not ((wait and i == 0) or future.done()):
                keep.append((block, future))
                continue
            try:
                written = future.result()
            except KVTierError as error:
                failure = failure or error
                continue
            self.counters.tiers[Tier.DISK].bytes_written += written
            block.slots[Tier.DISK] = 0
            self._free_copy(block, Tier.HOST)
        self._disk_writes = keep
        if failure is not None:
            raise failure

    def _finish_writes(self) -> None:
        for ticket in self._write_through.values():
            self.mover.finish(ticket)
        self._write_through.clear()
        while self._disk_writes:
            self._reap_disk_writes(wait=True)

    def _write_new_tokens(self, step: _Step, layer: int, stage: torch.Tensor) -> None:
        """Copy one layer's new tokens from staging into their blocks' GPU or host slots."""
        end = step.start + step.new
        pos = step.start
        to_host: list[Copy] = []
        for block in step.blocks:
            first = pos - block.index * self.block_tokens
            take = min(block.tokens - first, end - pos)
            if Tier.GPU in block.slots:
                view = self.gpu.layer_view(block.slots[Tier.GPU], layer)
                view[first : first + take].copy_(stage[pos : pos + take])
            else:
                view = self.host.layer_view(block.slots[Tier.HOST], layer)
                to_host.append((stage[pos : pos + take], view[first : first + take]))
                self.counters.tiers[Tier.HOST].bytes_written += take * self.layout.token_bytes
            pos += take
        if to_host:
            ticket = self.mover.write_through(self.shape.layer_devices[layer], to_host)
            self._step_writes.append(ticket)

    def _write_batched(self, step: _Step) -> None:
        """All layers' new tokens `[layers, q, 2, batch, kv_heads, head_dim]` into GPU slots."""
        new_kv = torch.stack(step.new_kv)
        pos = step.start
        for block in step.blocks:
            first = pos - block.index * self.block_tokens
            take = min(block.tokens - first, step.start + step.new - pos)
            at = pos - step.start
            self.gpu.slot_view(block.slots[Tier.GPU])[:, first : first + take].copy_(
                new_kv[:, at : at + take]
            )
            pos += take

    def _end_step(self) -> None:
        step = self._step
        assert step is not None
        self._step = None
        if step.new_kv:
            self._write_batched(step)
        for ticket in self._step_writes:
            self.mover.finish(ticket)
        self._step_writes.clear()
        self.tokens = step.start + step.new
        self.step_count += 1
        for block in self.table:
            block.last_access = self.step_count
            block.access_count += 1
        parent = self.table[step.blocks[0].index - 1].block_id if step.blocks[0].index else None
        sealed: list[BlockMeta] = []
        for block in step.blocks:
            if block.tokens == self.block_tokens:
                block.block_id = self._block_id(parent, block)
                sealed.append(block)
            parent = block.block_id
        if sealed:
            self._seal(sealed)
        self._promote()

    def _seal(self, blocks: list[BlockMeta]) -> None:
        """Write freshly sealed blocks through to host (D2H stream), so demotion is free later."""
        for block in blocks:
            if Tier.HOST in block.slots or Tier.GPU not in block.slots:
                continue  # written straight to host while it filled
            try:
                slot = self._allocate_host()
            except BudgetError:
                # write-through only makes a later demotion free; without host room the block
                # stays on the GPU alone and is copied down if it is ever demoted
                log.debug("no host room to write block %d through", block.index)
                continue
            block.slots[Tier.HOST] = slot
            by_device: dict[torch.device, list[Copy]] = {}
            for i, device in enumerate(self.shape.layer_devices):
                src = self.gpu.layer_view(block.slots[Tier.GPU], i)
                by_device.setdefault(device, []).append((src, self.host.layer_view(slot, i)))
            for device, copies in by_device.items():
                # one ticket per block is enough on a single device; with several, keep the last
                # and finish the others now (device_map runs are rare and not on the hot path)
                ticket = self.mover.write_through(device, copies)
                previous = self._write_through.pop(block.index, None)
                if previous is not None:
                    self.mover.finish(previous)
                self._write_through[block.index] = ticket
            self.counters.tiers[Tier.HOST].bytes_written += self.layout.slot_bytes
        self._reap_write_through()
        self._invalidate_plan()

    def _reap_write_through(self) -> None:
        for index in [i for i, t in self._write_through.items() if t.done()]:
            del self._write_through[index]

    def _promote(self) -> None:
        """Move streamed blocks (host or disk) into free GPU room, a few per step."""
        free_gpu = self.gpu.capacity_slots() - self.gpu.used_slots - PROMOTE_RESERVE_SLOTS
        moved = 0
        for block in self.table:
            if moved >= PROMOTE_PER_STEP or free_gpu <= 0:
                break
            if Tier.GPU in block.slots:
                continue
            slot = self.gpu.allocate()
            if slot is None:
                break
            self._copy_block(block, Tier.GPU, slot)
            if not block.sealed:
                # the open block takes new tokens in one place only: drop its host copy
                self._free_copy(block, Tier.HOST)
            free_gpu -= 1
            moved += 1
        self.counters.promotions += moved
        if moved:
            self._invalidate_plan()

    # -- copies --------------------------------------------------------------------------------
    def _copy_block(self, block: BlockMeta, tier: Tier, slot: int) -> None:
        """Copy every layer of `block` from its fastest tier into `slot` of `tier` (synchronously
        ordered with compute)."""
        pool = self.gpu if tier is Tier.GPU else self.host
        source = block.fastest_tier()
        for i in range(len(self.shape.layer_ids)):
            self._read_copy(block, source, i, pool.layer_view(slot, i))
        block.slots[tier] = slot
        self.counters.tiers[tier].bytes_written += self.layout.slot_bytes
        self._invalidate_plan()

    def _read_copy(self, block: BlockMeta, source: Tier, layer: int, dst: torch.Tensor) -> None:
        if source is Tier.DISK:
            landing = dst if dst.device.type == "cpu" else torch.empty_like(dst, device="cpu")
            if not self._disk_read(block.block_id, layer, landing):
                raise StoreCorruptError(
                    f"disk block {block.block_id} is missing or corrupt (quarantined); its "
                    "tokens cannot be recomputed inside this cache: re-run the prompt"
                )
            if landing is not dst:
                self.mover.copy_now([(landing, dst)])
            return
        pool = self.gpu if source is Tier.GPU else self.host
        self.mover.copy_now([(pool.layer_view(block.slots[source], layer), dst)])
        self.counters.tiers[source].bytes_read += self.layout.layer_slot_bytes

    def _disk_read(self, bid: str, layer: int, out: torch.Tensor) -> bool:
        start = time.perf_counter()
        ok = self.disk.read_tensor_into(bid, f"l{self.shape.layer_ids[layer]}.kv", out)
        counters = self.counters.tiers[Tier.DISK]
        counters.seconds += time.perf_counter() - start
        counters.bytes_read += out.numel() * out.element_size()
        return ok

    def _free_copy(self, block: BlockMeta, tier: Tier) -> None:
        slot = block.slots.pop(tier)
        if tier is Tier.GPU:
            self.gpu.free(slot)
        elif tier is Tier.HOST:
            self.host.free(slot)
        elif not self.cfg.disk.persist and self.disk is not None:
            self.disk.delete(block.block_id)
        self._invalidate_plan()

    def _drop(self, block: BlockMeta) -> None:
        self._write_through.pop(block.index, None)
        for tier in list(block.slots):
            self._free_copy(block, tier)

    def _rewrite_disk(self, block: BlockMeta, old_id: str, beam_idx: torch.Tensor) -> None:
        if block.block_id == old_id:
            return  # rows unchanged by this reorder (e.g. the prompt all beams share)
        tensors = {}
        for lid in self.shape.layer_ids:
            buf = torch.empty((self.block_tokens, *self.layout.token_shape), dtype=self.shape.dtype)
            if not self.disk.read_tensor_into(old_id, f"l{lid}.kv", buf):
                raise StoreCorruptError(f"disk block {old_id} is missing or corrupt (quarantined)")
            tensors[f"l{lid}.kv"] = buf.index_select(2, beam_idx.to("cpu"))
        parent = self.table[block.index - 1].block_id if block.index else None
        self.disk.write_block(block.block_id, tensors, parent_id=parent)
        if not self.cfg.disk.persist:
            self.disk.delete(old_id)

    def _block_id(self, parent: str | None, block: BlockMeta) -> str:
        if block.token_ids:
            flat = [t for row in block.token_ids for t in row]
            return block_id(parent, flat, self.fingerprint)
        # tokens unknown (inputs_embeds, or a reorder): unique per cache, never reused
        anon = f"anon:{id(self)}:{self.epoch}:{block.index}:{time.monotonic_ns()}".encode()
        return block_id(parent, anon, self.fingerprint)

    # -- gather --------------------------------------------------------------------------------
    def _invalidate_plan(self) -> None:
        self._plan = None
        self._placement += 1

    def _invalidate(self) -> None:
        self.epoch += 1
        self._plan = None
        self._placement += 1
        # a dropped prefetch may still be writing its staging buffer (disk reads run in threads)
        for prefetched in self._prefetched.values():
            self.mover.finish(prefetched.ticket)
        self._prefetched.clear()

    def _runs(self) -> list[tuple[Tier, int, int, int, int]]:
        """(tier, first slot, blocks, first position, tokens) runs covering committed tokens."""
        key = (self.epoch, self.tokens)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        runs: list[list] = []
        bt = self.block_tokens
        for block in self.table:
            start = block.index * bt
            if start >= self.tokens:
                break
            tokens = min(bt, self.tokens - start)
            tier = block.fastest_tier()
            slot = block.slots[tier]
            if tier is Tier.DISK:
                runs.append([tier, block.index, 1, start, tokens])
                continue
            pool = self.gpu if tier is Tier.GPU else self.host
            last = runs[-1] if runs else None
            if (
                last is not None
                and tokens == bt  # the open block always gets its own run (its copy changes)
                and last[0] is tier
                and last[4] == last[2] * bt
                and pool.contiguous(last[1] + last[2] - 1, slot)
            ):
                last[2] += 1
                last[4] += tokens
            else:
                runs.append([tier, slot, 1, start, tokens])
        plan = [tuple(r) for r in runs]
        self._plan = (key, plan)
        return plan

    def _gather(self, layer: int) -> Ticket:
        """Queue the copies that assemble `layer`'s committed K/V in its staging buffer.

        The views of whole-block runs are built once per placement and reused every step;
        only the open (partly filled) block's copy is made anew.
        """
        stage = self.staging.buffer(layer)
        runs = self._runs()
        open_run = runs[-1] if runs and runs[-1][4] < runs[-1][2] * self.block_tokens else None
        full = runs[:-1] if open_run is not None else runs
        key = (self._placement, self.tokens // self.block_tokens, id(stage))
        cached = self._views.get(layer)
        if cached is None or cached[0] != key:
            copies: list[Copy] = []
            disk: list[tuple[str, int, int]] = []
            nbytes = {Tier.GPU: 0, Tier.HOST: 0, Tier.DISK: 0}
            for tier, first, count, pos, tokens in full:
                nbytes[tier] += tokens * self.layout.token_bytes
                if tier is Tier.DISK:
                    disk.append((self.table[first].block_id, pos, tokens))
                    continue
                pool = self.gpu if tier is Tier.GPU else self.host
                copies.append((pool.run_view(first, count, layer), stage[pos : pos + tokens]))
            cached = (key, copies, disk, nbytes)
            self._views[layer] = cached
        _, copies, disk, nbytes = cached
        reads: list[DiskRead] = [
            (functools.partial(self._disk_read, bid, layer), stage[pos : pos + tokens])
            for bid, pos, tokens in disk
        ]
        if open_run is not None:
            tier, first, _, pos, tokens = open_run
            open_key = (self._placement, tier, first)
            cached_open = self._open_views.get(layer)
            if cached_open is None or cached_open[0] != open_key:
                pool = self.gpu if tier is Tier.GPU else self.host
                cached_open = (open_key, pool.run_view(first, 1, layer))
                self._open_views[layer] = cached_open
            src = cached_open[1]
            copies = [*copies, (src[:tokens], stage[pos : pos + tokens])]
            self.counters.tiers[tier].bytes_read += tokens * self.layout.token_bytes
        for tier, count in nbytes.items():
            if tier is not Tier.DISK:
                self.counters.tiers[tier].bytes_read += count
        self.counters.gathers += 1
        return self.mover.gather(self.shape.layer_devices[layer], copies, reads, target=stage)
