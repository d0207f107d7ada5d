"""Streaming: layers assembled in staging, gathers in flight, and the streamed step's writes.

While the sequence does not fit the GPU whole, each tiered layer's committed K/V is gathered
into its staging buffer (a prefetch, waited on when the layer runs), the step's new tokens are
written there for attention and into their blocks' slots. It plans and submits copies only;
placement decides where the blocks live.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvtier.blocks import Tier
from kvtier.controller.gather import Gather
from kvtier.controller.lost import lost_error
from kvtier.controller.placement import Placement
from kvtier.controller.stats import Counters
from kvtier.controller.step import Step, token_copies
from kvtier.layout import KVGeometry
from kvtier.tiers.base import TierStore
from kvtier.tiers.gpu import StagingRing, write_tokens
from kvtier.transfer import Lane, Mover, Ticket


@dataclass
class _Prefetch:
    ticket: Ticket
    key: tuple[int, int]  # (epoch, committed tokens) it was planned for


class Streamer:
    """The streamed path of one controller: prefetch tickets per tiered layer."""

    def __init__(
        self,
        geometry: KVGeometry,
        stores: dict[Tier, TierStore],
        *,
        staging: StagingRing,
        gather: Gather,
        placement: Placement,
        mover: Mover,
        counters: Counters,
    ) -> None:
        self.geometry = geometry
        self.stores = stores
        self.staging = staging
        self.gather = gather
        self.placement = placement
        self.mover = mover
        self.counters = counters
        self._prefetched: dict[int, _Prefetch] = {}

    def has(self, tiered_index: int, key: tuple[int, int]) -> bool:
        """Whether this layer's gather for `key` is already in flight (an older one is dropped)."""
        current = self._prefetched.get(tiered_index)
        if current is not None and current.key == key:
            return True
        if current is not None:
            self.mover.finish(self._prefetched.pop(tiered_index).ticket)
        return False

    def prefetch(self, tiered_index: int, tokens: int, key: tuple[int, int]) -> None:
        """Start gathering the first `tokens` positions of a layer into its staging buffer."""
        self._prefetched[tiered_index] = _Prefetch(self._submit(tiered_index, tokens), key)

    def drop(self) -> None:
        """Forget every prefetch (after an edit), waiting for them: a dropped one may still be
        writing its staging buffer (disk reads run in threads)."""
        for prefetched in self._prefetched.values():
            self.mover.finish(prefetched.ticket)
        self._prefetched.clear()

    def buffer_free_after(self, step: Step | None, tiered_index: int) -> bool:
        """Whether no layer of the step in progress still to run uses this layer's buffer."""
        if step is None:
            return True
        buffer = self.staging.buffer(tiered_index)
        remaining = range(step.layers_done, self.geometry.tiered_layers)
        return all(self.staging.buffer(layer) is not buffer for layer in remaining)

    def append(
        self,
        step: Step,
        tiered_index: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        *,
        key: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the layer's gather into staging, add the new tokens there and to their
        blocks; returns attention's K and V views of the staging buffer."""
        stalled = time.perf_counter()  # until staging is ready: the layer's prefetch stall
        prefetched = self._prefetched.pop(tiered_index, None)
        if prefetched is not None and prefetched.key != key:
            self.mover.finish(prefetched.ticket)
            prefetched = None
        if prefetched is None:
            self.counters.sync_gathers += 1
            prefetched = _Prefetch(self._submit(tiered_index, key[1]), key)
        if not self.mover.wait(prefetched.ticket):
            error = lost_error(prefetched.ticket, during="streaming")
            self.placement.lose(error)
            raise error
        self.counters.prefetch_stall_s += time.perf_counter() - stalled
        stage = self.staging.buffer(tiered_index)
        k_view, v_view = write_tokens(stage, step.start, keys, values)
        self._write_new_tokens(step, tiered_index, stage)
        return k_view, v_view

    def _submit(self, tiered_index: int, tokens: int) -> Ticket:
        start = time.perf_counter()
        stage = self.staging.buffer(tiered_index)
        copies = self.gather.copies(tiered_index, stage, tokens, self.placement.version)
        ticket = self.mover.submit(copies, lane=Lane.PREFETCH, target=stage)
        self.counters.gather_s += time.perf_counter() - start
        return ticket

    def _write_new_tokens(self, step: Step, tiered_index: int, stage: torch.Tensor) -> None:
        """Copy one layer's new tokens from staging into their blocks' slots: the fastest tier
        in compute order, a lower tier on the D2H stream."""
        top = self.placement.top
        into_top, lower = [], []
        for tier, copy in token_copies(step, tiered_index, stage, self.stores, top):
            (into_top if tier is top else lower).append(copy)
            if tier is not top:
                self.counters.tiers[tier].bytes_written += copy[1].nbytes
        if into_top:
            self.mover.submit(into_top, lane=Lane.NOW)
        if lower:
            self.placement.writes.add_step(self.mover.submit(lower, lane=Lane.WRITE_BACK))
