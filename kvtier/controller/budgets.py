"""Budgets: each tier's byte budget, the staging ring inside the GPU's, and changes at run time.

The GPU budget (one per device) holds the staging ring (while layers stream) and the slots; a
budget change moves down what no longer fits, through Placement. Arithmetic comes from layout.py.
"""

from __future__ import annotations

import torch

from kvtier.blocks import Tier
from kvtier.controller.placement import Placement
from kvtier.errors import BudgetError, KVTierError
from kvtier.layout import (
    DeviceBudgets,
    device_min_bytes,
    device_staging_bytes,
    gpu_limit,
    resident_gpu_bytes,
    staging_tokens,
    step_blocks,
    tightest_device,
)
from kvtier.tiers.gpu import StagingRing


class Budgets:
    """The budget side of one controller's placement (which owns the budgets mapping).

    The fastest tier's budget is per device (`placement.device_budgets`); its store's limit is
    `layout.gpu_limit`: bytes of whole blocks that fit every device beside its staging."""

    def __init__(self, placement: Placement, staging: StagingRing) -> None:
        self.placement = placement
        self.staging = staging
        self.geometry = placement.geometry
        self.stores = placement.stores
        self.budgets = placement.budgets
        self.top = placement.top

    @property
    def devices(self) -> dict[torch.device, int]:
        return self.placement.device_budgets

    def _where(self, device: torch.device) -> str:
        return "" if self.geometry.single_device else f" on {device}"

    def _limit(self, tokens: int, devices: DeviceBudgets | None = None) -> int:
        """The fastest store's limit with staging for `tokens` positions (0: none)."""
        devices = self.devices if devices is None else devices
        return gpu_limit(self.geometry, devices, tokens=tokens, buffers=self.staging.buffers)

    def check_minimum(
        self, changed: dict[Tier, int] | None = None, *, devices: DeviceBudgets | None = None
    ) -> None:
        """BudgetError unless the budgets (with `changed` ones, and `devices` as the fastest
        tier's, instead) can make progress: every device can stream, the next tier holds a
        block, and GPU and next tier together hold one prefill chunk's blocks."""
        budget = {**self.budgets, **(changed or {})}
        devices = self.devices if devices is None else devices
        block_bytes = self.geometry.block_bytes
        for device, device_budget in devices.items():
            need = device_min_bytes(self.geometry, device, buffers=self.staging.buffers)
            if device_budget < need:
                raise BudgetError(
                    f"gpu budget {device_budget} bytes{self._where(device)} is too small: "
                    "streaming needs staging for one block of every staging buffer plus one "
                    f"block slot, at least {need} bytes; raise gpu.budget or lower block_tokens "
                    "/ policy.prefetch_depth"
                )
        lower = self.placement.below(self.top)
        if lower is None:
            return
        name = lower.name.lower()
        lower_blocks = self.stores[lower].capacity_blocks(budget[lower])
        if lower_blocks < 1:
            raise BudgetError(
                f"{name} budget {budget[lower]} bytes cannot hold one block: need at least "
                f"{block_bytes} bytes (1 blocks of {block_bytes} bytes)"
            )
        # a chunk's blocks are unsealed until it ends, so they cannot go to disk: the tiers that
        # hold open blocks need room for one prefill chunk's blocks between them
        chunk_tokens = self.placement.cfg.prefill_chunk_tokens
        chunk = step_blocks(chunk_tokens, self.geometry.block_tokens)
        room = self.stores[self.top].capacity_blocks(self._limit(0, devices)) + lower_blocks
        if room < chunk:
            need = (chunk - room + lower_blocks) * block_bytes
            raise BudgetError(
                f"{name} budget {budget[lower]} bytes is too small: a prefill chunk of "
                f"{chunk_tokens} tokens fills {chunk} blocks that stay on gpu or {name} until it "
                f"ends; raise {name}.budget to at least {need} bytes or lower "
                "prefill_chunk_tokens"
            )

    def fit_staging(self, tokens: int) -> bool:
        """Grow staging to `tokens` positions, shrinking the fastest tier's room to keep within
        budget; True if the staging buffers were reallocated.

        Grows with 1/8 headroom when that costs no resident block, so decode does not
        reallocate staging (and drop its prefetches) at every block boundary.
        """
        if tokens <= self.staging.capacity_tokens:
            return False
        block_bytes = self.geometry.block_bytes
        roomy = tokens + tokens // 8
        keep = max(self.stores[self.top].used_slots, 1) * block_bytes  # at least one slot
        if self._limit(roomy) >= keep:
            tokens = roomy
        limit = self._limit(tokens)
        # one block of room is enough: new blocks that find none go straight to the next tier
        if limit < block_bytes:
            device = tightest_device(
                self.geometry, self.devices, tokens=tokens, buffers=self.staging.buffers
            )
            staging = device_staging_bytes(self.geometry, tokens, buffers=self.staging.buffers)
            need = staging + self.geometry.device_block_bytes(device)
            raise BudgetError(
                f"gpu budget {self.devices[device]} bytes{self._where(device)} cannot hold "
                f"{tokens} tokens: staging alone takes {staging} bytes; need at least {need} "
                "bytes (raise gpu.budget, lower policy.prefetch_depth, or use a smaller context)"
            )
        self._shrink(self.top, limit)
        return self.staging.ensure(tokens)

    def end_staging(self) -> None:
        """Free the staging ring and give its room back to the fastest tier (nothing streams)."""
        self.staging.close()
        self.stores[self.top].set_limit(self._limit(0))

    def _shrink(self, tier: Tier, limit_bytes: int) -> None:
        """Set a store's limit, moving out the blocks whose room goes away."""
        store = self.stores[tier]
        for handle in store.set_limit(limit_bytes):
            block = next(b for b in self.placement.table if b.slots.get(tier) == handle)
            self.placement.evict(block, tier)
        self.placement.finish_writes()
        store.release()

    def set_budget(
        self, tier: Tier, budget_bytes: int, *, device: torch.device | None = None
    ) -> None:
        """Change a tier's budget, moving down whatever no longer fits.

        For the fastest tier the budget applies to each device, or only to `device`. A budget
        that cannot work raises BudgetError and leaves the old budget in force (blocks moved so
        far stay moved, consistently).
        """
        if tier not in self.stores:
            raise BudgetError(
                f"no {tier.name.lower()} tier: set {tier.name.lower()}.budget > 0 when "
                "creating the cache"
            )
        if device is not None and (tier is not self.top or device not in self.devices):
            held = ", ".join(str(d) for d in self.devices)
            raise BudgetError(
                f"no {tier.name.lower()} budget for device {device}: per-device budgets are the "
                f"gpu tier's, on the devices holding tiered layers ({held})"
            )
        self.placement.finish_writes()
        store = self.stores[tier]
        old_budget, old_limit = self.budgets[tier], store.limit_bytes
        old_devices = dict(self.devices)
        if tier is self.top:
            names = [device] if device is not None else list(self.devices)
            devices = {**old_devices, **dict.fromkeys(names, budget_bytes)}
            limit = self._gpu_limit(devices)
            self.devices.update(devices)
            self.budgets[tier] = sum(devices.values())
        else:
            limit = self._limit_for(tier, budget_bytes)
            self.budgets[tier] = budget_bytes
        try:
            self._shrink(tier, limit)
        except KVTierError:
            self.budgets[tier] = old_budget
            self.devices.update(old_devices)
            self.placement.finish_writes()
            store.set_limit(old_limit)
            raise

    def _limit_for(self, tier: Tier, budget_bytes: int) -> int:
        """The store limit a budget of a lower tier gives, or BudgetError if it cannot work."""
        store, block_bytes, name = self.stores[tier], self.geometry.block_bytes, tier.name.lower()
        if self.placement.below(tier) is None:
            if budget_bytes < store.bytes_used:
                raise BudgetError(
                    f"{name} budget {budget_bytes} bytes is below the {store.bytes_used} bytes "
                    "of blocks stored only there; raise it or lower the context"
                )
            return budget_bytes
        if budget_bytes < block_bytes:
            raise BudgetError(
                f"{name} budget {budget_bytes} bytes is below one block ({block_bytes} bytes); "
                f"the {name} tier needs at least that"
            )
        self.check_minimum({tier: budget_bytes})
        return budget_bytes

    def _gpu_limit(self, devices: DeviceBudgets) -> int:
        """The GPU pool's limit under new per-device budgets: all of them while the sequence
        still fits whole, else what the staging for the tokens held leaves; BudgetError if the
        budgets cannot work."""
        self.check_minimum(devices=devices)
        tokens = self.placement.table.seq_tokens
        whole = self._limit(0, devices)
        in_place = resident_gpu_bytes(self.geometry, tokens) <= whole
        if in_place and not self.staging.capacity_tokens:
            return whole
        short = self._limit(self.staging.capacity_tokens, devices) < self.geometry.block_bytes
        if short and self.staging.capacity_tokens:
            self.staging.resize(tokens)  # give back the growth headroom
        held = max(self.staging.capacity_tokens, staging_tokens(self.geometry, tokens))
        limit = self._limit(held, devices)
        if limit < self.geometry.block_bytes:
            device = tightest_device(
                self.geometry, devices, tokens=held, buffers=self.staging.buffers
            )
            staging = device_staging_bytes(self.geometry, held, buffers=self.staging.buffers)
            raise BudgetError(
                f"gpu budget {devices[device]} bytes{self._where(device)} cannot hold the "
                f"{tokens} tokens held now: streaming them takes {staging} bytes of staging; "
                f"need at least {staging + self.geometry.device_block_bytes(device)}"
            )
        return limit
