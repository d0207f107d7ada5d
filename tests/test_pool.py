"""Slab pools and the staging ring: exact byte accounting, slot order, runs, budget changes."""

from __future__ import annotations

import pytest
import torch

from kvtier.tiers.gpu import GpuPool, StagingRing
from kvtier.tiers.host import HostPool
from kvtier.tiers.pool import SlotLayout

LAYOUT = SlotLayout((torch.device("cpu"),) * 3, 16, 1, 2, 8, torch.float32)


def test_slot_bytes():
    """Scenario: one slot is every layer's K and V of block_tokens positions."""
    assert LAYOUT.token_bytes == 2 * 1 * 2 * 8 * 4
    assert LAYOUT.slot_bytes == 3 * 16 * LAYOUT.token_bytes


def test_allocate_until_full_stays_within_budget():
    """Scenario: bytes_used is the slabs' real size and never exceeds the budget."""
    budget = 10 * LAYOUT.slot_bytes + 100
    pool = HostPool(LAYOUT, budget_bytes=budget, pin=False)
    slots = []
    while (slot := pool.allocate()) is not None:
        slots.append(slot)
        assert pool.bytes_used <= budget
    assert slots == list(range(10))  # lowest free slot first
    assert pool.bytes_used == 10 * LAYOUT.slot_bytes
    pool.free(3)
    assert pool.allocate() == 3


def test_run_view_is_one_contiguous_range():
    """Scenario: consecutive slots of one layer form one contiguous tensor (one copy moves it)."""
    pool = GpuPool(LAYOUT, budget_bytes=8 * LAYOUT.slot_bytes, slab_slots=4)
    for _ in range(8):
        pool.allocate()
    run = pool.run_view(0, 3, 1)
    assert run.shape == (48, 2, 1, 2, 8) and run.is_contiguous()
    assert pool.contiguous(2, 3) and not pool.contiguous(3, 4)  # slab boundary
    pool.layer_view(1, 1).fill_(7.0)
    assert torch.all(run[16:32] == 7.0)
    with pytest.raises(AssertionError):
        pool.run_view(3, 2, 0)


def test_set_budget_names_slots_to_evacuate_then_releases():
    """Scenario: lowering the budget frees whole slabs from the top once they are emptied."""
    pool = GpuPool(LAYOUT, budget_bytes=8 * LAYOUT.slot_bytes, slab_slots=4)
    for _ in range(6):
        pool.allocate()
    evacuate = pool.set_budget(4 * LAYOUT.slot_bytes)
    assert evacuate == [4, 5]
    for slot in evacuate:
        pool.free(slot)
    pool.release()
    assert pool.bytes_used == 4 * LAYOUT.slot_bytes
    assert pool.allocate() is None


def test_staging_ring_grows_in_blocks():
    """Scenario: staging capacity is whole blocks, counted for every buffer of the ring."""
    ring = StagingRing(LAYOUT, buffers=2)
    assert ring.bytes_for(17) == 2 * 32 * LAYOUT.token_bytes
    assert ring.ensure(17) and not ring.ensure(20)
    assert ring.buffer(0).shape == (32, 2, 1, 2, 8)
    assert ring.buffer(0) is not ring.buffer(1) and ring.buffer(0) is ring.buffer(2)


@pytest.mark.gpu
def test_pinned_host_pool_counts_real_pinned_bytes():
    """Scenario: pinned slabs are registered exactly (no power-of-two rounding)."""
    budget = 5 * LAYOUT.slot_bytes + 12345
    pool = HostPool(LAYOUT, budget_bytes=budget, pin=True)
    while pool.allocate() is not None:
        pass
    assert pool.pinned_bytes == pool.bytes_used <= budget
    pool.close()
    assert pool.pinned_bytes == 0
