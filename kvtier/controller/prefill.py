"""Layer-major prefill on the controller's side: one step whose layers arrive chunk by chunk.

The step reserves every block of the prompt at once. Each tiered layer then appends its chunks
in order into its staging buffer (after the cached past, gathered once per layer); when a
layer's last chunk is in, the layer is copied down into its blocks once, and the staging
buffer is reused two layers later, after that copy is done. Plans and submits copies only.
"""

from __future__ import annotations

import torch

from kvtier.blocks import Tier
from kvtier.controller.gather import Gather
from kvtier.controller.lost import lost_error
from kvtier.controller.placement import Placement
from kvtier.controller.stats import Counters
from kvtier.controller.step import Step, token_copies
from kvtier.errors import KVTierError
from kvtier.tiers.base import TierStore
from kvtier.tiers.gpu import StagingRing, write_tokens
from kvtier.transfer import Lane, Mover, Ticket


class LayerMajor:
    """The positions each tiered layer has appended so far in one layer-major step."""

    def __init__(
        self,
        step: Step,
        *,
        stores: dict[Tier, TierStore],
        staging: StagingRing,
        gather: Gather,
        placement: Placement,
        mover: Mover,
        counters: Counters,
    ) -> None:
        self.step = step
        self.stores = stores
        self.staging = staging
        self.gather = gather
        self.placement = placement
        self.mover = mover
        self.counters = counters
        self._written: dict[int, int] = {}  # tiered index -> positions appended
        self._flushes: dict[int, Ticket] = {}  # id(staging buffer) -> its layer's copy down

    def append(
        self, tiered_index: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one chunk `[batch, kv_heads, q, head_dim]` of a layer; returns the layer's K and V
        so far as strided views of its staging buffer. True in `done` once it is complete."""
        step = self.step
        position = self._written.get(tiered_index, step.start)
        stage = self.staging.buffer(tiered_index)
        if position == step.start:
            self._begin_layer(tiered_index, stage)
        end = position + keys.shape[-2]
        if end > step.end:
            raise KVTierError(
                f"tiered layer {tiered_index} appended past the {step.new} positions of this "
                "prefill; layers must bring the prompt's chunks in order"
            )
        k_view, v_view = write_tokens(stage, position, keys, values)
        self._written[tiered_index] = end
        if end == step.end:
            self._flush(tiered_index, stage)
            step.layers_done += 1
        return k_view, v_view

    @property
    def done(self) -> bool:
        return self.step.layers_done == self.staging.geometry.tiered_layers

    def _begin_layer(self, tiered_index: int, stage: torch.Tensor) -> None:
        """Before a layer's first chunk: the copy down of the layer that used this buffer
        before must be done, and the cached past goes in front."""
        flush = self._flushes.pop(id(stage), None)
        if flush is not None:
            self.mover.wait(flush)
        if not self.step.start:
            return
        copies = self.gather.copies(tiered_index, stage, self.step.start, self.placement.version)
        ticket = self.mover.submit(copies, lane=Lane.PREFETCH, target=stage)
        if not self.mover.wait(ticket):
            error = lost_error(ticket, during="a layer-major prefill")
            self.placement.lose(error)
            raise error

    def _flush(self, tiered_index: int, stage: torch.Tensor) -> None:
        """Copy the layer's new positions from staging into their blocks' slots, once."""
        top = self.placement.top
        into_top, lower = [], []
        for tier, copy in token_copies(self.step, tiered_index, stage, self.stores, top):
            (into_top if tier is top else lower).append(copy)
            self.counters.tiers[tier].bytes_written += copy[1].nbytes
        if into_top:
            self.mover.submit(into_top, lane=Lane.NOW)
        if lower:
            ticket = self.mover.submit(lower, lane=Lane.WRITE_BACK)
            self._flushes[id(stage)] = ticket
            self.placement.writes.add_step(ticket)
