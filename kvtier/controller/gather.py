"""Gather planning: which copies assemble a layer's committed K/V in its staging buffer.

Runs of blocks that one copy moves are planned once per placement; each layer's copies of whole
blocks are cached and reused every step, only the open (partly filled) block's copy is made anew.
It plans and counts; the mover copies and placement decides where blocks live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.blocks import BlockTable, Tier
from kvtier.controller.stats import Counters
from kvtier.copies import Sorted, sort_copies
from kvtier.layout import KVGeometry
from kvtier.tiers.base import Handle, TierStore
from kvtier.transfer import Copy


@dataclass(frozen=True, slots=True)
class Run:
    """`blocks` consecutive blocks one copy moves: from `first` in `tier`, covering positions
    [start, start + tokens)."""

    tier: Tier
    first: Handle
    blocks: int
    start: int
    tokens: int


@dataclass(frozen=True, slots=True)
class _LayerPlan:
    """The cached copies of one layer's whole-block runs and the bytes they read per tier."""

    key: tuple
    copies: list[Copy]
    nbytes: dict[Tier, int]
    # the copies sorted once for the mover when they are all tensor copies (memory tiers)
    sorted: Sorted | None


@dataclass(frozen=True, slots=True)
class _OpenView:
    key: tuple
    source: torch.Tensor


class Gather:
    """Per-layer gather plans over one block table; valid while (version, tokens) stay."""

    def __init__(
        self,
        geometry: KVGeometry,
        stores: dict[Tier, TierStore],
        table: BlockTable,
        counters: Counters,
    ) -> None:
        self.geometry = geometry
        self.stores = stores
        self.table = table
        self.counters = counters
        self._runs: tuple[tuple[int, int], list[Run]] | None = None
        self._single: tuple[tuple[int, int], Handle | None] | None = None
        self._layers: dict[int, _LayerPlan] = {}
        self._open: dict[int, _OpenView] = {}

    def runs(self, tokens: int, version: int) -> list[Run]:
        """Runs covering the first `tokens` positions, each block from its fastest tier."""
        if self._runs is not None and self._runs[0] == (version, tokens):
            return self._runs[1]
        bt = self.geometry.block_tokens
        runs: list[Run] = []
        last_handle: Handle | None = None
        for block in self.table:
            start = block.index * bt
            if start >= tokens:
                break
            count = min(bt, tokens - start)
            tier = block.fastest_tier()
            handle = block.slots[tier]
            last = runs[-1] if runs else None
            if (
                last is not None
                and count == bt  # the open block always gets its own run (its copy changes)
                and last.tier is tier
                and last.tokens == last.blocks * bt
                and self.stores[tier].contiguous(last_handle, handle)
            ):
                runs[-1] = Run(tier, last.first, last.blocks + 1, last.start, last.tokens + count)
            else:
                runs.append(Run(tier, handle, 1, start, count))
            last_handle = handle
        self._runs = ((version, tokens), runs)
        return runs

    def single_run(self, blocks: int, version: int) -> Handle | None:
        """The first handle if the first `blocks` blocks sit in the fastest tier as one run that
        one view covers (attention can then read them in place), else None."""
        key = (version, blocks)
        if self._single is not None and self._single[0] == key:
            return self._single[1]
        tier = min(self.stores)
        store = self.stores[tier]
        first = previous = None
        count = 0
        for block in self.table:
            if count == blocks:
                break
            handle = block.slots.get(tier)
            if handle is None or (previous is not None and not store.contiguous(previous, handle)):
                break
            first = handle if first is None else first
            previous = handle
            count += 1
        result = first if count == blocks and blocks else None
        self._single = (key, result)
        return result

    def copies(
        self, tiered_index: int, stage: torch.Tensor, tokens: int, version: int
    ) -> list[Copy] | Sorted:
        """The copies that fill `stage[:tokens]` for tiered layer `tiered_index` (sorted for the
        mover once per plan when all are tensor copies); counts the bytes."""
        bt = self.geometry.block_tokens
        runs = self.runs(tokens, version)
        open_run = runs[-1] if runs and runs[-1].tokens < runs[-1].blocks * bt else None
        full = runs[:-1] if open_run is not None else runs
        key = (version, tokens // bt, id(stage))
        plan = self._layers.get(tiered_index)
        if plan is None or plan.key != key:
            copies: list[Copy] = []
            nbytes = dict.fromkeys(self.stores, 0)
            for run in full:
                nbytes[run.tier] += run.tokens * self.geometry.token_bytes
                source = self.stores[run.tier].source(run.first, tiered_index, run.blocks)
                copies.append((source, stage[run.start : run.start + run.tokens]))
            tensors = all(isinstance(source, torch.Tensor) for source, _ in copies)
            plan = _LayerPlan(key, copies, nbytes, sort_copies(copies) if tensors else None)
            self._layers[tiered_index] = plan
        for tier, count in plan.nbytes.items():
            self.counters.tiers[tier].bytes_read += count
        self.counters.gathers += 1
        if open_run is None:
            return plan.copies if plan.sorted is None else plan.sorted
        open_key = (version, open_run.tier, open_run.first)
        view = self._open.get(tiered_index)
        if view is None or view.key != open_key:
            view = _OpenView(
                open_key, self.stores[open_run.tier].source(open_run.first, tiered_index)
            )
            self._open[tiered_index] = view
        count = open_run.tokens
        self.counters.tiers[open_run.tier].bytes_read += count * self.geometry.token_bytes
        start = open_run.start
        last = (view.source[:count], stage[start : start + count])
        return [*plan.copies, last] if plan.sorted is None else plan.sorted.plus(last)
