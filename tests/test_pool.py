"""Slab pools and the staging ring: exact byte accounting, slot order, runs, budget changes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import kvtier
from kvtier.blocks import Tier
from kvtier.layout import KVGeometry
from kvtier.tiers import host as host_module
from kvtier.tiers.gpu import GpuPool, StagingRing
from kvtier.tiers.host import HostPool
from kvtier.tiers.pool import SlabPool


def _geometry(devices, block_tokens, batch, kv_heads, head_dim, dtype) -> KVGeometry:
    """The geometry of `len(devices)` tiered layers, the layer on `devices[i]`."""
    layer_ids = tuple(range(len(devices)))
    return KVGeometry(layer_ids, tuple(devices), batch, kv_heads, head_dim, dtype, block_tokens)


LAYOUT = _geometry((torch.device("cpu"),) * 3, 16, 1, 2, 8, torch.float32)
SLOT = LAYOUT.block_bytes


def _slab_bytes(pool: SlabPool) -> int:
    """Bytes of the tensors the pool really holds."""
    return sum(t.numel() * t.element_size() for slab in pool._slabs for t in slab)


def _fill_all(pool: SlabPool) -> list[int]:
    slots = []
    while (slot := pool.allocate()) is not None:
        slots.append(slot)
        assert pool.bytes_used <= pool.limit_bytes
    return slots


def test_slot_bytes():
    """Scenario: one slot is every layer's K and V of block_tokens positions."""
    assert LAYOUT.token_bytes == 2 * 1 * 2 * 8 * 4
    assert LAYOUT.layer_block_bytes == 16 * LAYOUT.token_bytes
    assert LAYOUT.block_bytes == 3 * 16 * LAYOUT.token_bytes
    assert LAYOUT.token_shape == (2, 1, 2, 8) and LAYOUT.tiered_layers == 3
    half = _geometry((torch.device("cpu"),) * 2, 32, 4, 8, 64, torch.bfloat16)
    assert half.block_bytes == 2 * 32 * 2 * 4 * 8 * 64 * 2


def test_allocate_until_full_stays_within_budget():
    """Scenario: bytes_used is the slabs' real size and never exceeds the budget."""
    budget = 10 * SLOT + 100
    pool = HostPool(LAYOUT, limit_bytes=budget, pin=False)
    slots = _fill_all(pool)
    assert slots == list(range(10))  # lowest free slot first
    assert pool.bytes_used == 10 * SLOT == _slab_bytes(pool)
    assert pool.used_slots == 10 and pool.capacity_blocks() == 10
    pool.free(3)
    pool.free(1)
    assert pool.used_slots == 8
    assert pool.allocate() == 1 and pool.allocate() == 3
    assert pool.allocate() is None
    pool.close()
    assert pool.bytes_used == 0 and pool.used_slots == 0


@pytest.mark.parametrize("slab_slots", [1, 3, 4, 16])
def test_growth_is_lazy_and_slab_by_slab(slab_slots):
    """Scenario: slabs are allocated only when a slot is needed, one at a time, the last one cut
    to the budget."""
    pool = SlabPool(LAYOUT, limit_bytes=10 * SLOT, slab_slots=slab_slots)
    assert pool.bytes_used == 0 == _slab_bytes(pool)
    for count in range(1, 11):
        assert pool.allocate() == count - 1
        slabs = -(-count // slab_slots)
        assert pool.bytes_used == min(10, slabs * slab_slots) * SLOT == _slab_bytes(pool)
    assert pool.allocate() is None


def test_default_slab_size_is_a_quarter_of_the_budget():
    pool = SlabPool(LAYOUT, limit_bytes=40 * SLOT)
    assert pool.slab_slots == 10
    small = SlabPool(LAYOUT, limit_bytes=SLOT)  # at least one slot per slab
    assert small.slab_slots == 1
    capped = SlabPool(LAYOUT, limit_bytes=400 * SLOT, max_slab_bytes=5 * SLOT)
    assert capped.slab_slots == 5


def test_require_names_the_minimum():
    pool = HostPool(LAYOUT, limit_bytes=2 * SLOT - 1, pin=False)
    pool.require(1, "one block")
    with pytest.raises(kvtier.BudgetError, match=f"need at least {2 * SLOT} bytes"):
        pool.require(2, "two blocks")


def test_run_view_is_one_contiguous_range():
    """Scenario: consecutive slots of one layer form one contiguous tensor (one copy moves it)."""
    pool = SlabPool(LAYOUT, limit_bytes=8 * SLOT, slab_slots=4)
    for _ in range(8):
        pool.allocate()
    run = pool.source(0, 1, 3)
    assert run.shape == (48, 2, 1, 2, 8) and run.is_contiguous()
    assert pool.contiguous(2, 3) and not pool.contiguous(3, 4)  # slab boundary
    assert not pool.contiguous(1, 3) and not pool.contiguous(3, 2)
    pool.source(1, 1).fill_(7.0)
    assert torch.all(run[16:32] == 7.0)
    with pytest.raises(AssertionError):
        pool.source(3, 0, 2)


def test_views_of_slots_and_layers_never_overlap():
    """Scenario: every (slot, layer) view is its own memory; slot_view stacks a slot's layers."""
    pool = SlabPool(LAYOUT, limit_bytes=6 * SLOT, slab_slots=4)
    slots = _fill_all(pool)
    for slot in slots:
        for layer in range(LAYOUT.tiered_layers):
            view = pool.source(slot, layer)
            assert view.shape == (16, *LAYOUT.token_shape) and view.is_contiguous()
            view.fill_(slot * 10 + layer)
    for slot in slots:
        stacked = pool.slot_view(slot)
        assert stacked.shape == (LAYOUT.tiered_layers, 16, *LAYOUT.token_shape)
        for layer in range(LAYOUT.tiered_layers):
            assert torch.all(pool.source(slot, layer) == slot * 10 + layer)
            assert torch.equal(stacked[layer], pool.source(slot, layer))


def test_layers_on_several_devices():
    """Scenario: a device_map layout keeps one tensor per device in a slab, each layer on its own
    device; bytes_used still counts every layer."""
    devices = (torch.device("cpu"), torch.device("meta"), torch.device("cpu"))
    layout = _geometry(devices, 16, 1, 2, 8, torch.float32)
    pool = SlabPool(layout, limit_bytes=4 * layout.block_bytes, slab_slots=2)
    assert not pool.geometry.single_device
    _fill_all(pool)
    assert pool.bytes_used == 4 * layout.block_bytes
    assert [pool.source(3, i).device for i in range(3)] == list(devices)
    assert pool.source(2, 2, 2).shape == (32, 2, 1, 2, 8)


def test_set_budget_names_slots_to_evacuate_then_releases():
    """Scenario: lowering the budget frees whole slabs from the top once they are emptied."""
    pool = SlabPool(LAYOUT, limit_bytes=8 * SLOT, slab_slots=4)
    for _ in range(6):
        pool.allocate()
    evacuate = pool.set_limit(4 * SLOT)
    assert evacuate == [4, 5]
    for slot in evacuate:
        pool.free(slot)
    pool.release()
    assert pool.bytes_used == 4 * SLOT == _slab_bytes(pool)
    assert pool.allocate() is None


def test_set_budget_keeps_the_data_of_kept_slabs():
    pool = SlabPool(LAYOUT, limit_bytes=12 * SLOT, slab_slots=4)
    slots = _fill_all(pool)
    for slot in slots:
        pool.slot_view(slot).fill_(slot)
    evacuate = pool.set_limit(5 * SLOT)  # slab 1 still over: 8 slots > 5
    assert evacuate == list(range(4, 12))
    for slot in evacuate:
        pool.free(slot)
    pool.release()
    assert pool.bytes_used == 4 * SLOT
    for slot in range(4):
        assert torch.all(pool.slot_view(slot) == slot)
    # room for one more slot under the new budget: a short slab
    assert pool.allocate() == 4 and pool.allocate() is None
    assert pool.bytes_used == 5 * SLOT == _slab_bytes(pool)


def test_raising_the_budget_lets_the_pool_grow_again():
    pool = SlabPool(LAYOUT, limit_bytes=4 * SLOT, slab_slots=4)
    assert len(_fill_all(pool)) == 4
    assert pool.set_limit(8 * SLOT) == []
    assert pool.capacity_blocks() == 8
    assert _fill_all(pool) == [4, 5, 6, 7]
    assert pool.bytes_used == 8 * SLOT


def test_short_slab_in_use_does_not_block_growth():
    """Scenario: a slab cut short by the budget holds blocks; a raised budget still grows the
    pool: the next slab starts at the next slab boundary."""
    pool = SlabPool(LAYOUT, limit_bytes=6 * SLOT, slab_slots=4)
    assert _fill_all(pool) == list(range(6))  # slab 1 holds only 2 slots
    pool.set_limit(8 * SLOT)
    assert pool.capacity_blocks() == 8
    assert pool.allocate() == 8
    assert pool.bytes_used <= 8 * SLOT


def test_raised_budget_is_usable_once_the_short_slab_empties():
    """Scenario: budget 6 slots (slabs of 4: one full, one short of 2), raised to 8, the short
    slab emptied: filling used to stop at 6 slots (allocate() reused the short slab's own free
    slots first, then _grow refused while that slab was in use)."""
    pool = SlabPool(LAYOUT, limit_bytes=6 * SLOT, slab_slots=4)
    _fill_all(pool)
    pool.set_limit(8 * SLOT)
    pool.free(4)
    pool.free(5)
    _fill_all(pool)
    assert pool.used_slots == pool.capacity_blocks() == 8


def test_freed_slots_of_released_slabs_are_forgotten():
    pool = SlabPool(LAYOUT, limit_bytes=8 * SLOT, slab_slots=4)
    _fill_all(pool)
    for slot in range(8):
        pool.free(slot)
    assert pool.set_limit(4 * SLOT) == []
    pool.release()
    assert _fill_all(pool) == [0, 1, 2, 3]


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / free / budget changes against a set of used slots."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = SlabPool(LAYOUT, limit_bytes=6 * SLOT, slab_slots=3)
        self.used: dict[int, float] = {}  # slot -> the value written into it

    @rule()
    def allocate(self) -> None:
        free_in_slabs = [
            s
            for i, count in enumerate(self.pool._slab_counts)
            for s in range(i * self.pool.slab_slots, i * self.pool.slab_slots + count)
            if s not in self.used
        ]
        room = self.pool.limit_bytes - self.pool.bytes_used >= SLOT
        slot = self.pool.allocate()
        if free_in_slabs:
            assert slot == min(free_in_slabs)  # lowest free slot first
        elif slot is None:
            short = self.pool._slab_counts and self.pool._slab_counts[-1] < self.pool.slab_slots
            assert not room or short  # full, or a short slab in use blocks growth
        if slot is not None:
            assert slot not in self.used
            self.used[slot] = float(slot + 1)
            self.pool.slot_view(slot).fill_(slot + 1)

    @precondition(lambda self: self.used)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(sorted(self.used)))
        del self.used[slot]
        self.pool.free(slot)

    @rule(slots=st.integers(0, 12))
    def set_budget(self, slots: int) -> None:
        budget = slots * SLOT + (SLOT // 2 if slots % 2 else 0)
        evacuate = self.pool.set_limit(budget)
        assert evacuate == sorted(evacuate) and set(evacuate) <= set(self.used)
        for slot in evacuate:  # the controller moves these blocks elsewhere first
            del self.used[slot]
            self.pool.free(slot)
        self.pool.release()

    @invariant()
    def accounting(self) -> None:
        assert self.pool.bytes_used == _slab_bytes(self.pool)
        assert self.pool.bytes_used <= self.pool.limit_bytes
        assert self.pool.used_slots == len(self.used)
        for slot, value in self.used.items():  # live data never moves or gets overwritten
            assert torch.all(self.pool.slot_view(slot) == value)


PoolMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestPool = PoolMachine.TestCase


# -- host pool -------------------------------------------------------------------------------------
def test_host_pool_unpinned_on_cpu():
    """Scenario: without CUDA the host pool is plain RAM and counts no pinned bytes."""
    pool = HostPool(LAYOUT, limit_bytes=3 * SLOT, pin=False)
    assert _fill_all(pool) == [0, 1, 2]
    assert pool.pinned_bytes == 0 and not pool.source(0, 0).is_pinned()
    assert pool.tier is Tier.HOST
    if not torch.cuda.is_available():
        assert HostPool(LAYOUT, limit_bytes=SLOT).pin is False  # pin=None follows CUDA
    pool.close()


@pytest.mark.gpu
def test_pinned_host_pool_counts_real_pinned_bytes():
    """Scenario: pinned slabs are registered exactly (no power-of-two rounding), in the
    background: a slab is usable before its registration is done."""
    budget = 5 * SLOT + 12345
    pool = HostPool(LAYOUT, limit_bytes=budget, pin=True)
    while pool.allocate() is not None:
        pass
    pool.finish_pinning()
    assert pool.pinned_bytes == pool.bytes_used <= budget
    assert pool.source(0, 0).is_pinned()
    assert pool.set_limit(2 * SLOT) != []
    for slot in range(pool.used_slots):
        pool.free(slot)
    pool.release()
    pool.finish_pinning()
    assert pool.pinned_bytes == pool.bytes_used <= 2 * SLOT
    pool.close()
    assert pool.pinned_bytes == 0


# -- staging ring ----------------------------------------------------------------------------------
def test_staging_ring_grows_in_blocks():
    """Scenario: staging capacity is whole blocks, counted for every buffer of the ring."""
    ring = StagingRing(LAYOUT, buffers=2)
    assert ring.bytes_used == 0 and ring.bytes_for(0) == 0
    assert ring.bytes_for(1) == ring.bytes_for(16) == 2 * 16 * LAYOUT.token_bytes
    assert ring.bytes_for(17) == 2 * 32 * LAYOUT.token_bytes
    assert ring.ensure(17) and not ring.ensure(20) and not ring.ensure(32)
    assert ring.capacity_tokens == 32 and ring.bytes_used == ring.bytes_for(32)
    assert ring.buffer(0).shape == (32, 2, 1, 2, 8)
    assert ring.buffer(0) is not ring.buffer(1) and ring.buffer(0) is ring.buffer(2)
    assert ring.ensure(33) and ring.buffer(0).shape == (48, 2, 1, 2, 8)
    ring.close()
    assert ring.capacity_tokens == 0 and ring.bytes_used == 0


@pytest.mark.parametrize("buffers", [1, 2, 3, 4])
def test_staging_ring_layers_take_turns(buffers):
    """Scenario: layer j uses buffer j % buffers, so depth + 1 layers can be in flight at once."""
    layout = _geometry((torch.device("cpu"),) * 5, 16, 2, 2, 8, torch.float16)
    ring = StagingRing(layout, buffers=buffers)
    ring.ensure(5)
    distinct = {id(ring.buffer(j)) for j in range(5)}
    assert len(distinct) == min(buffers, 5)
    for j in range(5):
        assert ring.buffer(j) is ring.buffer(j % buffers)
    assert ring.bytes_used == buffers * 16 * layout.token_bytes


def test_staging_ring_counts_each_device():
    devices = (torch.device("cpu"), torch.device("meta"))
    layout = _geometry(devices, 16, 1, 2, 8, torch.float32)
    ring = StagingRing(layout, buffers=2)
    assert ring.bytes_for(16) == 2 * 2 * 16 * layout.token_bytes
    ring.ensure(16)
    assert ring.buffer(0).device.type == "cpu" and ring.buffer(1).device.type == "meta"


# -- the GPU pool: one slot-ordered tensor per layer, grown by reallocation ------------------------
def test_gpu_pool_grows_in_place_and_keeps_slot_order():
    """Scenario: the GPU pool grows by reallocating (copying what it holds), never past the
    limit; blocks allocated in order keep slot == index, so one view covers the sequence."""
    retired: list[torch.Tensor] = []
    pool = GpuPool(LAYOUT, limit_bytes=10 * SLOT, retire=retired.extend)
    assert pool.bytes_used == 0
    slots = [pool.allocate() for _ in range(6)]
    assert slots == list(range(6)) and pool.capacity_slots >= 6
    assert pool.bytes_used == pool.capacity_slots * SLOT <= 10 * SLOT
    for slot in slots:
        for layer in range(LAYOUT.tiered_layers):
            pool.source(slot, layer).fill_(slot * 10 + layer)
    assert retired, "growth hands the replaced tensors to retire"
    while pool.allocate() is not None:
        pass
    assert pool.capacity_slots == 10 and pool.used_slots == 10
    for layer in range(LAYOUT.tiered_layers):
        run = pool.source(0, layer, 6)
        assert run.is_contiguous() and run.shape == (6 * 16, *LAYOUT.token_shape)
        for slot in slots:  # growth kept every value
            assert torch.all(run[slot * 16 : (slot + 1) * 16] == slot * 10 + layer)
    assert all(pool.contiguous(a, a + 1) for a in range(9))


def test_gpu_pool_reserve_and_shrink():
    """Scenario: reserve grows ahead of need; a lower limit names the slots to move out, and
    release shrinks the tensors keeping the data of the slots below the limit."""
    pool = GpuPool(LAYOUT, limit_bytes=8 * SLOT)
    assert pool.reserve(5) and pool.capacity_slots == 5
    assert not pool.reserve(3)
    assert pool.reserve(100) and pool.capacity_slots == 8  # capped at the limit
    for slot in range(6):
        assert pool.allocate() == slot
        pool.source(slot, 0).fill_(slot)
    assert pool.set_limit(4 * SLOT) == [4, 5]
    pool.free(4)
    pool.free(5)
    pool.release()
    assert pool.capacity_slots == 4 and pool.bytes_used == 4 * SLOT
    assert [int(pool.source(s, 0)[0, 0, 0, 0, 0]) for s in range(4)] == [0, 1, 2, 3]
    assert pool.allocate() is None  # full at the lower limit
    pool.close()
    assert pool.bytes_used == 0


# -- pinned slabs kept between pools ---------------------------------------------------------------
class _FakePinning:
    """cudaHostRegister/Unregister stand-ins: CPU tests of which buffers get pinned when."""

    def __init__(self, monkeypatch) -> None:
        self.registered: set[int] = set()
        self.calls = 0
        monkeypatch.setattr(host_module, "register", self.register)
        monkeypatch.setattr(host_module, "unregister", self.unregister)
        monkeypatch.setattr(host_module, "KEPT", host_module.KeptSlabs())

    def register(self, buffer: torch.Tensor) -> bool:
        self.calls += 1
        self.registered.add(buffer.data_ptr())
        return True

    def unregister(self, buffer: torch.Tensor) -> bool:
        self.registered.remove(buffer.data_ptr())
        return True


def _pinned_pool(limit: int, *, layout: KVGeometry = LAYOUT, keep: bool = True) -> HostPool:
    pool = HostPool(layout, limit_bytes=limit, pin=True, keep_pinned=keep)
    while pool.allocate() is not None:
        pass
    pool.finish_pinning()
    return pool


def test_closed_pool_slabs_serve_the_next_pool_without_registering(monkeypatch):
    """Scenario: a second cache of the process takes the first one's pinned slabs as they are
    (registering stalls the GPU; PyTorch's pinned allocator keeps its blocks the same way)."""
    pins = _FakePinning(monkeypatch)
    first = _pinned_pool(8 * SLOT)
    pointers = {first.source(slot, 0).data_ptr() for slot in (0, 4)}
    assert first.pinned_bytes == first.bytes_used and pins.calls == 4  # 4 slabs of 2 slots
    first.close()
    assert first.pinned_bytes == 0 and len(pins.registered) == 4
    assert host_module.KEPT.nbytes == 8 * SLOT
    second = HostPool(LAYOUT, limit_bytes=8 * SLOT, pin=True)
    second.allocate()
    assert second.pinned_bytes == 2 * SLOT  # pinned at once: no registration to wait for
    while second.allocate() is not None:
        pass
    assert pins.calls == 4 and host_module.KEPT.nbytes == 0
    assert {second.source(s, 0).data_ptr() for s in range(8)} >= pointers
    second.source(3, 1).fill_(7.0)  # the views have the pool's shape and dtype
    assert second.source(3, 1).dtype == LAYOUT.dtype and bool((second.source(3, 1) == 7.0).all())
    second.close()
    assert kvtier.release_pinned_memory() == 8 * SLOT
    assert not pins.registered and host_module.KEPT.nbytes == 0


def test_keep_pinned_false_unregisters_on_close(monkeypatch):
    pins = _FakePinning(monkeypatch)
    _pinned_pool(4 * SLOT, keep=False).close()
    assert not pins.registered and host_module.KEPT.nbytes == 0


def test_a_pool_of_another_slab_size_frees_the_kept_slabs_first(monkeypatch):
    """Scenario: kept slabs never double the RAM: a pool whose slabs differ in size unregisters
    and drops them before it allocates its own."""
    pins = _FakePinning(monkeypatch)
    _pinned_pool(8 * SLOT).close()
    other = _geometry((torch.device("cpu"),) * 2, 16, 1, 2, 8, torch.float32)
    pool = _pinned_pool(8 * other.block_bytes, layout=other)
    assert host_module.KEPT.nbytes == 0 and len(pins.registered) == 4  # only the new pool's
    assert pins.calls == 8
    pool.close()


def test_slabs_are_not_kept_when_ram_runs_short(monkeypatch):
    pins = _FakePinning(monkeypatch)
    pool = _pinned_pool(4 * SLOT)
    short = type("Memory", (), {"available": 5, "total": 100})()
    monkeypatch.setattr(host_module.psutil, "virtual_memory", lambda: short)
    pool.close()
    assert not pins.registered and host_module.KEPT.nbytes == 0


def test_host_buffers_keep_what_was_written_when_populated():
    """Scenario: the pinning thread faults a slab's pages in while the tier may already be
    writing to it: populating never changes a byte."""
    buffer = host_module.host_buffer(4 << 20)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 4 << 20
    buffer[: 1 << 20].fill_(7)
    buffer[-5:] = torch.arange(5, dtype=torch.uint8)
    host_module.populate(buffer)  # False where the kernel lacks MADV_POPULATE_WRITE: harmless
    assert bool((buffer[: 1 << 20] == 7).all()) and buffer[-5:].tolist() == [0, 1, 2, 3, 4]
    assert bool((buffer[1 << 20 : -5] == 0).all())
