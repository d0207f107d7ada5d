"""Layers on several devices (device_map), on a CPU: per-device slots, staging and budgets.

The devices are fake: `torch.device("cpu", i)` names differ (so the geometry, the pools, the
staging ring and the budgets treat them as separate devices) while the tensors live in RAM.
A recorder around `torch.empty` notes which device each tensor was allocated for, so a test can
check that every layer's blocks and staging really sit on that layer's device.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule
from test_controller import (
    BLOCK_TOKENS,
    CHUNK_TOKENS,
    DEPTH,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    MACHINE_SETTINGS,
    MAX_TOKENS,
    ControllerMachine,
    Shadow,
    _disk_need,
    _random_step,
    _step,
)

import kvtier
from kvtier.blocks import Tier
from kvtier.controller import TierController
from kvtier.layout import (
    KVGeometry,
    device_min_bytes,
    device_staging_bytes,
    gpu_limit,
    plan_context,
    staging_bytes,
)
from kvtier.tiers.gpu import StagingRing

BUFFERS = DEPTH + 1
FAKE = tuple(torch.device("cpu", index) for index in range(3))


def _geometry(devices: tuple[torch.device, ...], *, batch: int = 1) -> KVGeometry:
    return KVGeometry(
        layer_ids=tuple(range(len(devices))),
        layer_devices=devices,
        batch=batch,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=torch.float32,
        block_tokens=BLOCK_TOKENS,
    )


def _budget(kv: KVGeometry, device: torch.device, slots: int, tokens: int = MAX_TOKENS) -> int:
    """A budget of `device` holding staging for `tokens` and `slots` GPU slots' share there."""
    staging = device_staging_bytes(kv, tokens, buffers=BUFFERS)
    return staging + slots * kv.device_block_bytes(device)


class AllocationRecorder:
    """Wraps `torch.empty`: storage address -> the device a tensor was asked for."""

    def __init__(self) -> None:
        self.devices: dict[int, torch.device] = {}
        self._empty = torch.empty

    def __enter__(self) -> AllocationRecorder:
        def empty(*args, **kwargs):
            tensor = self._empty(*args, **kwargs)
            device = kwargs.get("device")
            if device is not None and tensor.numel():
                self.devices[tensor.untyped_storage().data_ptr()] = torch.device(device)
            return tensor

        torch.empty = empty
        return self

    def __exit__(self, *exc: object) -> None:
        torch.empty = self._empty

    def device_of(self, view: torch.Tensor) -> torch.device | None:
        return self.devices.get(view.untyped_storage().data_ptr())


def check_devices(ctl: TierController, recorder: AllocationRecorder) -> None:
    """Every GPU-tier slot view and staging buffer of tiered layer i was allocated on layer i's
    device, host copies on the CPU; layers of one device never share a buffer within reach of
    the prefetch, and layers of different devices never share one."""
    kv, gpu = ctl.geometry, ctl.stores[Tier.GPU]
    for block in ctl.table:
        for tier, handle in block.slots.items():
            if not ctl.stores[tier].holds_open_blocks:
                continue
            for layer in range(kv.tiered_layers):
                want = kv.layer_devices[layer] if tier is Tier.GPU else torch.device("cpu")
                got = recorder.device_of(ctl.stores[tier].source(handle, layer))
                assert got == want, f"block {block.index} layer {layer} {tier.name}: {got}"
    check_ring(ctl.staging, recorder)
    # the per-device budget from first principles: slot tensors + staging on each device
    for device, budget in ctl.placement.device_budgets.items():
        slots = gpu.capacity_slots * kv.layers_on(device) * kv.layer_block_bytes
        staging = ctl.staging.buffers * ctl.staging.capacity_tokens * kv.token_bytes
        assert slots + staging <= budget, f"{device}: {slots} + {staging} > {budget}"


def check_ring(ring: StagingRing, recorder: AllocationRecorder) -> None:
    """Each layer's staging buffer is on its device and holds the ring's capacity; two layers
    share a buffer only on one device with at least `buffers` of its layers from the first up
    to the second (so a prefetch of depth buffers - 1 never overwrites a buffer in use)."""
    if not ring.capacity_tokens:
        return
    kv = ring.geometry
    buffers = [ring.buffer(layer) for layer in range(kv.tiered_layers)]
    for layer, buffer in enumerate(buffers):
        assert recorder.device_of(buffer) == kv.layer_devices[layer], layer
        assert buffer.shape[0] == ring.capacity_tokens
    for first in range(kv.tiered_layers):
        for second in range(first + 1, kv.tiered_layers):
            if buffers[first].data_ptr() != buffers[second].data_ptr():
                continue
            device = kv.layer_devices[second]
            between = [d for d in kv.layer_devices[first:second] if d == device]
            assert kv.layer_devices[first] == device, (first, second)
            assert len(between) >= ring.buffers, (first, second, kv.layer_devices)


@settings(max_examples=200, deadline=None)
@given(
    devices=st.lists(st.sampled_from(FAKE), min_size=1, max_size=8).map(tuple),
    buffers=st.integers(1, 4),
    tokens=st.integers(1, 100),
)
def test_staging_ring_buffers_sit_on_their_layers_devices(devices, buffers, tokens):
    """Scenario: a ring over layers spread on fake devices, any prefetch depth."""
    kv = _geometry(devices)
    with AllocationRecorder() as recorder:
        ring = StagingRing(kv, buffers=buffers)
        ring.ensure(tokens)
        check_ring(ring, recorder)
        for device in kv.devices:
            assert ring.bytes_on(device) == device_staging_bytes(kv, tokens, buffers=buffers)
        assert ring.bytes_on(torch.device("cpu")) == 0
        assert ring.bytes_used == sum(ring.bytes_on(d) for d in kv.devices)


# -- the planner's arithmetic ----------------------------------------------------------------------
devices_strategy = st.lists(st.sampled_from(FAKE), min_size=1, max_size=6).map(tuple)


@settings(max_examples=200, deadline=None)
@given(
    devices=devices_strategy,
    data=st.data(),
    tokens=st.integers(0, 2000),
    buffers=st.integers(1, 4),
)
def test_gpu_limit_is_the_most_slots_every_device_holds(devices, data, tokens, buffers):
    """Scenario: the slots the GPU limit allows fit each device beside its staging, and one more
    slot would overflow some device."""
    kv = _geometry(devices)
    budgets = {d: data.draw(st.integers(1, 40 * kv.block_bytes), label=str(d)) for d in kv.devices}
    slots = gpu_limit(kv, budgets, tokens=tokens, buffers=buffers) // kv.block_bytes
    staging = device_staging_bytes(kv, tokens, buffers=buffers)
    fits = [staging + slots * kv.device_block_bytes(d) <= budgets[d] for d in kv.devices]
    over = [staging + (slots + 1) * kv.device_block_bytes(d) > budgets[d] for d in kv.devices]
    assert all(fits) or slots < 0
    assert any(over)
    if kv.single_device:  # the one-device rule it replaces: budget - staging
        (budget,) = budgets.values()
        assert gpu_limit(kv, budgets, tokens=tokens, buffers=buffers) == budget - staging


@settings(max_examples=200, deadline=None)
@given(devices=devices_strategy, data=st.data(), tokens=st.integers(1, 3000))
def test_a_plan_that_runs_fits_every_device(devices, data, tokens):
    """Scenario: plan_context's per-device rows add up and respect each device's budget."""
    kv = _geometry(devices)
    overrides = {
        str(d): data.draw(st.integers(1, 30 * kv.block_bytes), label=str(d))
        for d in kv.devices
        if data.draw(st.booleans(), label=f"override {d}")
    }
    default = data.draw(st.integers(1, 30 * kv.block_bytes), label="gpu.budget")
    plan = plan_context(
        kv,
        tokens,
        gpu_budget=default,
        host_budget=10**9,
        disk_budget=10**9,
        buffers=BUFFERS,
        gpu_devices=overrides,
    )
    assert [d.device for d in plan.devices] == list(kv.devices)
    assert sum(d.layers for d in plan.devices) == kv.tiered_layers
    assert sum(d.staging_bytes for d in plan.devices) == plan.staging_bytes
    assert sum(d.slot_bytes for d in plan.devices) == plan.gpu_blocks * kv.block_bytes
    for row in plan.devices:
        assert row.budget_bytes == overrides.get(str(row.device), default)
        assert row.min_bytes == device_min_bytes(kv, row.device, buffers=BUFFERS, tokens=tokens)
        if plan.problem is None:
            assert row.staging_bytes + row.slot_bytes <= row.budget_bytes, row
    assert plan.min_gpu_bytes == max(row.min_bytes for row in plan.devices)
    if plan.problem is None and not plan.in_place:
        # the smallest per-device budget a plan names is enough on every device
        again = plan_context(
            kv,
            tokens,
            gpu_budget=plan.min_gpu_bytes,
            host_budget=10**9,
            disk_budget=10**9,
            buffers=BUFFERS,
        )
        assert again.problem is None


def test_uneven_split_the_device_with_more_layers_bounds_the_slots(tmp_path):
    """Scenario: one layer on cpu:0 and two on cpu:1 under one gpu.budget: cpu:1 fills first,
    and a budget too small names that device."""
    kv = _geometry((FAKE[0], FAKE[1], FAKE[1]))
    budget = _budget(kv, FAKE[1], 4)  # four slots on cpu:1 (where a slot is 2 layers)
    cfg = _config(tmp_path, budget)
    ctl = TierController(cfg, kv, fingerprint="uneven", streaming=True)
    try:
        ctl.budgets.fit_staging(MAX_TOKENS)
        room = budget - device_staging_bytes(kv, ctl.staging.capacity_tokens, buffers=BUFFERS)
        slots = ctl.stores[Tier.GPU].capacity_blocks()
        assert slots == room // kv.device_block_bytes(FAKE[1]) >= 2  # staging took some room
        assert room // kv.device_block_bytes(FAKE[0]) > slots
        assert ctl.stats()["gpu"]["budget_bytes"] == 2 * budget  # both devices' budgets
        small = device_min_bytes(kv, FAKE[1], buffers=BUFFERS) - 1
        try:
            ctl.set_budget(Tier.GPU, small, device=FAKE[1])
        except kvtier.BudgetError as error:
            assert "on cpu:1" in str(error) and str(small) in str(error)
        else:
            raise AssertionError("a cpu:1 budget below its minimum was accepted")
        assert ctl.placement.device_budgets == {FAKE[0]: budget, FAKE[1]: budget}
    finally:
        ctl.close()


def test_an_override_shrinks_one_device_only(tmp_path):
    """Scenario: [gpu.devices] gives cpu:0 less than gpu.budget; the slots follow cpu:0."""
    kv = _geometry((FAKE[0], FAKE[0], FAKE[1]))
    small = _budget(kv, FAKE[0], 2)
    cfg = _config(tmp_path, 10 * small, devices={"cpu:0": small})
    ctl = TierController(cfg, kv, fingerprint="override", streaming=True)
    try:
        ctl.budgets.fit_staging(MAX_TOKENS)
        assert ctl.placement.device_budgets == {FAKE[0]: small, FAKE[1]: 10 * small}
        room = small - device_staging_bytes(kv, ctl.staging.capacity_tokens, buffers=BUFFERS)
        assert ctl.stores[Tier.GPU].capacity_blocks() == room // kv.device_block_bytes(FAKE[0])
        assert ctl.stores[Tier.GPU].capacity_blocks() <= 2
        ctl.set_budget(Tier.GPU, 10 * small)  # one value: every device
        assert ctl.stores[Tier.GPU].capacity_blocks() > 2
        try:
            ctl.set_budget(Tier.HOST, 10 * small, device=FAKE[0])
        except kvtier.BudgetError as error:
            assert "per-device budgets are the gpu tier's" in str(error)
        else:
            raise AssertionError("a per-device host budget was accepted")
    finally:
        ctl.close()


def _config(store, gpu_budget: int, *, devices: dict[str, int] | None = None, host_blocks=6):
    kv = _geometry((FAKE[0],) * LAYERS)
    return kvtier.load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=CHUNK_TOKENS,
        gpu={"budget": gpu_budget, "devices": devices or {}},
        host_budget=host_blocks * kv.block_bytes,
        disk_path=str(store),
        disk_budget=_disk_need(1, torch.float32),
        disk_codec="raw",
        policy_name="lru",
        policy_sink_tokens=16,
        policy_recent_tokens=16,
        policy_prefetch_depth=DEPTH,
    )


# -- the state machine, with the layers spread over fake devices -----------------------------------
class DeviceMachine(ControllerMachine):
    """ControllerMachine's appends, crops and reads with LAYERS layers on 1-3 fake devices, each
    with its own GPU budget; budget changes per device or for all."""

    def __init__(self) -> None:
        super().__init__()
        self.recorder = AllocationRecorder().__enter__()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.recorder.__exit__(None, None, None)

    @initialize(
        devices=st.lists(st.sampled_from(FAKE), min_size=LAYERS, max_size=LAYERS).map(tuple),
        data=st.data(),
        host_blocks=st.integers(4, 6),
        prompt=st.integers(0, MAX_TOKENS),
        seed=st.integers(0, 2**32 - 1),
        streaming=st.booleans(),
    )
    def start(self, devices, data, host_blocks, prompt, seed, streaming) -> None:
        kv = _geometry(devices)
        budgets = {
            str(d): _budget(kv, d, 1 + data.draw(st.integers(0, 3), label=f"extra slots {d}"))
            for d in kv.devices
        }
        cfg = _config(self.store, max(budgets.values()), devices=budgets, host_blocks=host_blocks)
        self.ctl = TierController(cfg, kv, fingerprint="devices", streaming=streaming)
        self.shadow = Shadow(self.batch, self.dtype)
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, prompt, CHUNK_TOKENS):
            q = min(CHUNK_TOKENS, prompt - start)
            keys, values = _random_step(generator, q, self.batch, self.dtype)
            ids = torch.randint(0, 2**62, (self.batch, q), generator=generator)
            full = _step(self.ctl, keys, values, ids=ids, prefetch=True)
            self.shadow.append(keys, values)
        if prompt:
            self.shadow.assert_full(full)

    @rule(data=st.data())
    def set_budget(self, data) -> None:
        """A GPU budget that works, for one device or all; host and disk as the base machine."""
        kv = self.ctl.geometry
        target = data.draw(st.sampled_from([None, *kv.devices]), label="device")
        slots = data.draw(st.integers(1, 7), label="slots")
        names = kv.devices if target is None else (target,)
        budget = max(_budget(kv, d, slots) for d in names)
        before = dict(self.ctl.placement.device_budgets)
        self.ctl.set_budget(Tier.GPU, budget, device=target)
        after = self.ctl.placement.device_budgets
        assert after == {d: budget if d in names else before[d] for d in before}
        assert self.ctl.stats()["gpu"]["budget_bytes"] == sum(after.values())

    @rule(data=st.data())
    def reject_too_small_budget(self, data) -> None:
        """One byte below a device's minimum raises BudgetError and changes no budget."""
        kv = self.ctl.geometry
        device = data.draw(st.sampled_from(kv.devices), label="device")
        before = dict(self.ctl.placement.device_budgets)
        too_small = device_min_bytes(kv, device, buffers=BUFFERS) - 1
        try:
            self.ctl.set_budget(Tier.GPU, too_small, device=device)
        except kvtier.BudgetError:
            pass
        else:
            raise AssertionError(f"{device}: {too_small} bytes accepted")
        assert self.ctl.placement.device_budgets == before

    @invariant()
    def on_their_devices(self) -> None:
        if self.ctl is not None:
            check_devices(self.ctl, self.recorder)


DeviceMachine.TestCase.settings = MACHINE_SETTINGS
TestDeviceController = DeviceMachine.TestCase


def test_staging_bytes_count_each_device_once():
    """Scenario: the ring holds `buffers` buffers per device, whatever the layers per device."""
    kv = _geometry((FAKE[0], FAKE[1], FAKE[1], FAKE[2], FAKE[2], FAKE[2]))
    per_device = device_staging_bytes(kv, 100, buffers=BUFFERS)
    assert per_device == BUFFERS * 112 * kv.token_bytes  # 100 tokens in whole 16-token blocks
    assert staging_bytes(kv, 100, buffers=BUFFERS) == 3 * per_device
