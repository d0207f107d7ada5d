"""TierController: the step cycle and the edits of one sequence batch's tiered KV.

Per step it reserves room for the new positions, gathers each layer's committed K/V into staging
(prefetch, then wait), writes the new tokens, and commits: blocks that fill are sealed and
placement settles. Crop, reorder, budget changes, reset and close are edits between steps.
Placement decides where blocks live, Gather plans copies, the Mover copies.
"""

from __future__ import annotations

import logging

import torch

from kvtier.blocks import BlockMeta, BlockTable, Tier
from kvtier.config import Config
from kvtier.controller.budgets import Budgets
from kvtier.controller.gather import Gather
from kvtier.controller.index import INDEX
from kvtier.controller.inspection import Inspection
from kvtier.controller.placement import Placement
from kvtier.controller.prefill import LayerMajor
from kvtier.controller.stats import Counters
from kvtier.controller.step import PendingIds, Step
from kvtier.controller.streaming import Streamer
from kvtier.errors import BudgetError, KVTierError, StoreCorruptError
from kvtier.layout import ContextPlan, KVGeometry, plan_context
from kvtier.policy import make_policy
from kvtier.tiers import build_stores
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.gpu import StagingRing, write_tokens
from kvtier.transfer import Mover

log = logging.getLogger(__name__)


class TierController(Inspection):
    """Owns the block table, the tier stores and the mover for one sequence (all batch rows)."""

    def __init__(
        self,
        cfg: Config,
        geometry: KVGeometry,
        *,
        fingerprint: str,
        mover: Mover | None = None,
        store: DiskStore | None = None,
        streaming: bool = False,
    ) -> None:
        """`streaming=True` streams layers through staging from the first step even while the
        whole sequence would fit in place (benchmarks and tests of the streamed path)."""
        if geometry.block_tokens != cfg.block_tokens:
            raise KVTierError(
                f"geometry has {geometry.block_tokens}-token blocks but the config "
                f"{cfg.block_tokens}; build the geometry from the same config"
            )
        self.cfg = cfg
        self.geometry = geometry
        self.fingerprint = fingerprint
        self.depth = cfg.policy.prefetch_depth
        self.mover = mover or Mover()
        self.staging = StagingRing(geometry, buffers=self.depth + 1)
        self.stores = stores = build_stores(
            cfg, geometry, fingerprint=fingerprint, disk_store=store
        )
        self.table = BlockTable(geometry.block_tokens)
        self.counters = Counters()
        self.placement = Placement(
            cfg,
            geometry,
            stores,
            policy=make_policy(cfg.policy, geometry.block_tokens),
            table=self.table,
            mover=self.mover,
            staging=self.staging,
            counters=self.counters,
        )
        self.budgets = Budgets(self.placement, self.staging)
        self.gather = Gather(geometry, stores, self.table, self.counters)
        self.streamer = Streamer(
            geometry,
            stores,
            staging=self.staging,
            gather=self.gather,
            placement=self.placement,
            mover=self.mover,
            counters=self.counters,
        )
        self._layer_major: LayerMajor | None = None
        self._top_counters = self.counters.tiers[self.placement.top]  # hot path: no lookups
        self._tiered_layers = geometry.tiered_layers
        self.tokens = 0  # committed tokens, every tier
        # False while the whole sequence sits in the fastest tier as one run that attention reads
        # in place; True once layers are streamed through staging
        self.streaming = streaming
        self._always_stream = streaming
        self.epoch = 0  # bumped by every edit: prefetches of an older epoch are stale
        self._step: Step | None = None
        self._pending_ids: PendingIds | None = None
        self.budgets.check_minimum()
        INDEX.register(self)  # other caches of this model may reuse its sealed blocks

    # -- the step cycle ------------------------------------------------------------------------
    def note_tokens(self, token_ids: torch.Tensor | None) -> None:
        """Token ids `[batch, q]` of the next append (from the model's pre-hook); they key ids."""
        self._pending_ids = None if token_ids is None else PendingIds(token_ids)

    @property
    def in_step(self) -> bool:
        return self._step is not None

    def begin_step(self, new_tokens: int) -> None:
        """Reserve room for `new_tokens` positions; done before the first tiered layer runs."""
        if self._step is not None:
            raise KVTierError("begin_step called twice without the step finishing")
        if new_tokens <= 0:
            raise KVTierError(f"a step must append at least one token, got {new_tokens}")
        self.placement.raise_deferred()
        if self.placement.lost:
            self._refuse_lost()
        ids, self._pending_ids = self._pending_ids, None
        if ids is not None and ids.shape != (self.geometry.batch, new_tokens):
            ids = None  # e.g. chunked inputs the hook could not see; fall back to anonymous ids
        end = self.tokens + new_tokens
        blocks_after = self.geometry.blocks_for(end)
        if not self.streaming and not self._can_stay_in_place(blocks_after):
            self.streaming = True  # the sequence outgrows the GPU: stream layers from now on
        if self.streaming:
            self._fit_staging(end)
        blocks: list[BlockMeta] = []
        later: list[tuple[BlockMeta, int, int]] = []  # pieces the ids extend at the step's end
        pos = self.tokens
        top_full = False  # once no GPU room could be made this step, the rest go lower at once
        while pos < end:
            block = self.table.open_block()
            if not block.slots:
                protected = frozenset(b.index for b in blocks)
                top_full = not self._place_new_block(block, protected=protected, skip_top=top_full)
            take = min(self.geometry.block_tokens - block.tokens, end - pos)
            later.append((block, pos - self.tokens, take))
            block.tokens += take
            blocks.append(block)
            pos += take
        run = None
        if not self.streaming:
            run = self.gather.single_run(blocks_after, self.placement.version)
            if run is None:  # a block landed out of order: stream this step and those after
                self.streaming = True
                self._fit_staging(end)
        self._step = Step(self.tokens, new_tokens, blocks, run=run, pending_ids=(ids, later))
        self._step.layer_bytes = new_tokens * self.geometry.token_bytes

    def _refuse_lost(self) -> None:
        start = min(self.placement.lost) * self.geometry.block_tokens
        raise StoreCorruptError(
            f"the cache lost the only copy of tokens from position {start} on (a stored block "
            f"went missing or failed verification); crop the cache to {start} tokens or fewer "
            "(cache.crop), or reset it and re-run the prompt"
        )

    def begin_layer_major(self, new_tokens: int) -> None:
        """Start a prefill of `new_tokens` positions whose tiered layers each append all of them,
        in chunks, one layer after the other (hf/prefill.py drives it). It streams: each layer
        is assembled whole in staging and copied down into its blocks once."""
        self.streaming = True
        self.begin_step(new_tokens)
        self._layer_major = LayerMajor(
            self._step,
            stores=self.stores,
            staging=self.staging,
            gather=self.gather,
            placement=self.placement,
            mover=self.mover,
            counters=self.counters,
        )

    def _can_stay_in_place(self, blocks: int) -> bool:
        """Whether `blocks` blocks can all sit in the fastest tier as one run read in place."""
        if blocks > self.stores[self.placement.top].capacity_blocks():
            return False
        held = len(self.table)
        return not held or self.gather.single_run(held, self.placement.version) is not None

    def _place_new_block(
        self, block: BlockMeta, *, protected: frozenset[int], skip_top: bool = False
    ) -> bool:
        """A new block goes to the GPU if room can be made, else straight to the next tier (a
        long prefill chunk demotes as it fills); if neither has room, a pinned GPU block makes
        it (pins are the policy's preference; the step must go on). True if it went to the
        GPU because room was found there."""
        placement, top = self.placement, self.placement.top
        lower = placement.below(top)
        try:
            handle = None
            if not skip_top:
                handle = placement.allocate(
                    top, block, protected=protected, seq_tokens=self.tokens, required=False
                )
            tier, on_top = top, handle is not None
            if handle is None and lower is not None:
                tier = lower
                handle = placement.allocate(lower, block, required=False)
            if handle is None:
                tier = top
                handle = placement.allocate(top, block, protected=protected, pins=False)
            block.slots[tier] = handle
            return on_top
        except KVTierError:
            if not block.slots:
                self.table.truncate(block.index)
            raise

    def plan(self, tokens: int) -> ContextPlan:
        """Check that `tokens` positions can fit the budgets before any of them is computed
        (BudgetError with the reason otherwise) and reserve GPU room or start streaming."""
        budgets = self.placement.budgets
        devices = self.placement.device_budgets
        plan = plan_context(
            self.geometry,
            tokens,
            gpu_budget=min(devices.values()),
            gpu_devices={str(device): budget for device, budget in devices.items()},
            host_budget=budgets.get(Tier.HOST, 0),
            disk_budget=budgets.get(Tier.DISK, 0),
            buffers=self.staging.buffers,
        )
        if plan.problem is not None:
            raise BudgetError(plan.problem)
        if not plan.in_place:
            self.streaming = True
        elif not self.streaming:
            self.stores[self.placement.top].reserve_ahead(plan.gpu_blocks)
        return plan

    def abort_step(self) -> None:
        """Undo a step whose forward failed midway: no half-written tokens stay behind."""
        step = self._step
        if step is None:
            return
        self._step = None
        self._layer_major = None
        self.placement.writes.finish_step()
        bt = self.geometry.block_tokens
        for block in step.blocks:
            block.tokens = max(0, min(bt, step.start - block.index * bt))
            if block.token_ids:
                block.token_ids = [row[: block.tokens] for row in block.token_ids]
        for block in self.table.truncate(-(-step.start // bt)):
            self.placement.drop(block)
        self._invalidate()

    def prefetch(self, tiered_index: int, *, next_step: bool = False) -> None:
        """Start assembling tiered layer `tiered_index`'s committed K/V in its staging buffer.

        `next_step`: for the step after the one in progress (whose tokens then count as
        committed; the layer has written them already), so the copy stream runs on across the
        step boundary instead of waiting for the step to end."""
        if not self.streaming:
            return  # the layers are read in place: nothing to assemble
        if next_step and not self.streamer.buffer_free_after(self._step, tiered_index):
            return  # its staging buffer is still this step's: the post-step hook gathers it
        tokens = self._step.end if next_step and self._step is not None else self.tokens
        key = (self.epoch, tokens)
        if self.streamer.has(tiered_index, key):
            return
        if tokens + 1 > self.staging.capacity_tokens:
            if self._step is not None:
                return  # staging is in use by this step: the next step gathers for itself
            try:  # room for the next token too, so the next step keeps this prefetch
                self._fit_staging(tokens + 1)
            except BudgetError:
                return  # the step itself will say whether the budget can hold it
            key = (self.epoch, tokens)
        self.streamer.prefetch(tiered_index, tokens, key)

    def append(
        self, tiered_index: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's K/V `[batch, kv_heads, q, head_dim]` for tiered layer `tiered_index`.

        Returns the layer's full K and V `[batch, kv_heads, tokens, head_dim]` as strided views
        of its staging buffer: valid until the layer d+1 places later reuses that buffer.
        """
        if self._layer_major is not None:
            return self._append_layer_major(tiered_index, keys, values)
        if tiered_index == 0:
            self._check_batch(keys)  # the step's other layers see the same batch
            if self._step is None:
                self.begin_step(keys.shape[-2])
        step = self._step
        if step is None or keys.shape[-2] != step.new:
            raise KVTierError(
                f"tiered layer {tiered_index} appended {keys.shape[-2]} tokens but the step expects "
                f"{None if step is None else step.new}; layers must be called in order"
            )
        if step.run is not None:
            run, offset = self.stores[self.placement.top].run_start(
                step.run, tiered_index, step.blocks[-1].index + 1
            )
            k_view, v_view = write_tokens(
                run, step.start, keys, values, offset=offset, positions=step.positions(keys)
            )
        else:
            key = (self.epoch, self.tokens)
            k_view, v_view = self.streamer.append(step, tiered_index, keys, values, key=key)
        self._top_counters.bytes_written += step.layer_bytes
        step.layers_done += 1
        if step.layers_done == self._tiered_layers:
            self._end_step()
        return k_view, v_view

    def _append_layer_major(self, tiered_index: int, keys: torch.Tensor, values: torch.Tensor):
        self._check_batch(keys)
        k_view, v_view = self._layer_major.append(tiered_index, keys, values)
        if self._layer_major.done:
            self._layer_major = None
            self._end_step()
        return k_view, v_view

    def _check_batch(self, keys: torch.Tensor) -> None:
        if keys.shape[0] != self.geometry.batch:
            raise KVTierError(
                f"batch size changed from {self.geometry.batch} to {keys.shape[0]}; "
                "use a new TieredCache (or cache.reset()) for a new batch"
            )

    def _end_step(self) -> None:
        step = self._step
        assert step is not None
        self._step = None
        step.extend_pending_ids()  # before the full blocks are sealed: their ids need them
        self.placement.writes.finish_step()
        self.tokens = step.start + step.new
        self.counters.steps += 1
        for block in self.table:
            block.last_access = self.counters.steps
            block.access_count += 1
        sealed = [b for b in step.blocks if b.tokens == self.geometry.block_tokens]
        for block in sealed:
            self.table.seal(block, self.fingerprint)
        # write-through only pays while layers stream (a block may be demoted any step); in
        # place, a block is copied down only if the sequence ever outgrows the GPU
        self.placement.after_commit(sealed, write_through=self.streaming)

    def _fit_staging(self, tokens: int) -> None:
        if self.budgets.fit_staging(tokens):
            self._invalidate()

    # -- edits ---------------------------------------------------------------------------------
    def crop(self, tokens: int) -> None:
        """Keep the first `tokens` positions; a sealed block cut into becomes the open block."""
        if self._step is not None:
            raise KVTierError("crop called in the middle of a forward pass")
        tokens = max(0, min(tokens, self.tokens))
        if tokens == self.tokens:
            return
        placement = self.placement
        bt = self.geometry.block_tokens
        keep = -(-tokens // bt)
        if keep and tokens % bt and keep - 1 in placement.lost:
            raise StoreCorruptError(
                f"crop({tokens}) would keep part of block {keep - 1}, whose only copy was lost; "
                f"crop to {(keep - 1) * bt} tokens or fewer"
            )
        placement.finish_writes()
        for block in self.table.truncate(keep):
            placement.drop(block)
        placement.lost = {index for index in placement.lost if index < keep}
        self.tokens = tokens
        if keep and tokens % bt:
            self._reopen(self.table[keep - 1], tokens % bt)
        self._invalidate()

    def _reopen(self, block: BlockMeta, tokens: int) -> None:
        """Make a sealed block the open one again, holding its first `tokens` positions in
        exactly one writable copy (in a tier that holds open blocks)."""
        placement = self.placement
        writable = [t for t in block.slots if self.stores[t].holds_open_blocks]
        if not writable:
            lower = placement.below(placement.top)
            placement.copy_into(block, lower, placement.allocate(lower, block))
            writable = [lower]
        keep = min(writable)
        for tier in [t for t in block.slots if t is not keep]:
            placement.free_copy(block, tier)
        if block.token_ids:
            block.token_ids = [row[:tokens] for row in block.token_ids]
        block.tokens = tokens
        block.block_id = None

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch rows of every block in every tier (beam search)."""
        placement = self.placement
        placement.finish_writes()
        for block in self.table:
            old_id = block.block_id
            if block.token_ids:
                order = beam_idx.tolist()
                block.token_ids = [list(block.token_ids[i]) for i in order]
            if block.sealed:
                self.table.seal(block, self.fingerprint)
            for tier, handle in list(block.slots.items()):
                block.slots[tier] = self.stores[tier].reorder_rows(
                    handle,
                    beam_idx,
                    old_key=old_id,
                    new_key=block.block_id,
                    parent_id=self.table.parent_id(block),
                )
        self._invalidate()

    def set_budget(
        self, tier: Tier, budget_bytes: int, *, device: torch.device | None = None
    ) -> None:
        """Change a tier's budget at run time, moving down whatever no longer fits.

        The GPU budget applies to each device, or to `device` only. A budget that cannot work
        raises BudgetError and leaves the old budget in force.
        """
        if self._step is not None:
            raise KVTierError("set_budget called in the middle of a forward pass")
        try:
            self.budgets.set_budget(tier, budget_bytes, device=device)
        finally:
            self._invalidate()

    def reset(self) -> None:
        """Drop every block in every tier (the store keeps files only when persist = true)."""
        self.placement.finish_writes()
        for block in self.table.truncate(0):
            self.placement.drop(block)
        self.placement.lost.clear()
        self.tokens = 0
        self._step = None
        self._invalidate()
        if not self._always_stream:
            self.budgets.end_staging()
            self.streaming = False

    def close(self) -> None:
        self.reset()
        for store in self.stores.values():
            store.close()
        self.staging.close()
        self.mover.close()

    def _invalidate(self) -> None:
        self.epoch += 1
        self.placement.version += 1
        self.streamer.drop()
