"""KV geometry and the budget planner: the one home of every byte count kvtier derives.

`KVGeometry` says what one position of one tiered layer weighs; the functions below turn it into
staging bytes, the smallest GPU budget that can make progress, and per-tier budgets. The
controller, the demo and the tests all call these (and `kvtier plan` will); nothing else
repeats them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """The tiered KV of one sequence batch. `tiered_index` i is model layer `layer_ids[i]`."""

    layer_ids: tuple[int, ...]  # model layer id of each tiered layer, by tiered index
    layer_devices: tuple[torch.device, ...]  # where each tiered layer's GPU-tier copy lives
    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_tokens: int

    @property
    def tiered_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The distinct devices of the tiered layers, in first-use order."""
        return tuple(dict.fromkeys(self.layer_devices))

    @property
    def single_device(self) -> bool:
        return len(self.devices) == 1

    def layers_on(self, device: torch.device) -> int:
        """Tiered layers whose GPU-tier copy lives on `device`."""
        return sum(1 for d in self.layer_devices if d == device)

    def device_block_bytes(self, device: torch.device) -> int:
        """Bytes of one block's layers on `device` (a GPU slot's share of that device)."""
        return self.layers_on(device) * self.layer_block_bytes

    @property
    def token_shape(self) -> tuple[int, int, int, int]:
        # one position of one layer, K and V side by side: [2, batch, kv_heads, head_dim]
        return (2, self.batch, self.kv_heads, self.head_dim)

    @property
    def token_bytes(self) -> int:
        """Bytes of one position of one tiered layer (K and V)."""
        return 2 * self.batch * self.kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one layer of one block."""
        return self.block_tokens * self.token_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one whole block: every tiered layer, K and V."""
        return self.tiered_layers * self.layer_block_bytes

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of the KV of `tokens` positions over every tiered layer."""
        return tokens * self.tiered_layers * self.token_bytes

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def on_host(self) -> KVGeometry:
        """The same geometry with every layer on the CPU (the host tier's copy)."""
        return dataclasses.replace(self, layer_devices=(CPU,) * self.tiered_layers)


def staging_tokens(geometry: KVGeometry, tokens: int) -> int:
    """Positions a staging buffer holds to assemble `tokens` positions: whole blocks."""
    return geometry.blocks_for(tokens) * geometry.block_tokens


# A step's new positions are written into staging (what attention reads) and into their blocks,
# which are born on host when the GPU has no room: so the GPU needs staging and one slot, no more
MIN_GPU_BLOCKS = 1


def device_staging_bytes(geometry: KVGeometry, tokens: int, *, buffers: int) -> int:
    """Bytes of the staging ring on each device assembling `tokens` positions: `buffers`
    position-ordered buffers of one layer (buffers = prefetch_depth + 1), the same on every
    device that holds a tiered layer."""
    return buffers * staging_tokens(geometry, tokens) * geometry.token_bytes


def staging_bytes(geometry: KVGeometry, tokens: int, *, buffers: int) -> int:
    """GPU bytes of the staging ring assembling `tokens` positions, every device together."""
    return len(geometry.devices) * device_staging_bytes(geometry, tokens, buffers=buffers)


# -- per-device GPU budgets ----------------------------------------------------------------------
# A block spans every tiered layer, so a GPU slot takes `device_block_bytes(d)` on each device d
# and the slots one device's budget allows bound them all. The GPU pool's limit is given in bytes
# of whole blocks: each device's room (budget less its staging) scaled by its share of the layers,
# the tightest device winning. With one device that is exactly budget - staging.
DeviceBudgets = Mapping[torch.device, int]


def device_budgets(
    geometry: KVGeometry, budget_bytes: int, overrides: Mapping[str, int] | None = None
) -> dict[torch.device, int]:
    """Each device's GPU budget: `budget_bytes` (gpu.budget applies to each device) unless
    `overrides` (gpu.devices, by device name such as "cuda:1") names that device."""
    overrides = overrides or {}
    return {device: overrides.get(str(device), budget_bytes) for device in geometry.devices}


def _device_room(
    geometry: KVGeometry, device: torch.device, budget: int, tokens: int, buffers: int
) -> int:
    """Device `device`'s room under `budget` with staging for `tokens`, scaled to whole blocks."""
    room = budget - device_staging_bytes(geometry, tokens, buffers=buffers)
    return room * geometry.tiered_layers // geometry.layers_on(device)


def tightest_device(
    geometry: KVGeometry, budgets: DeviceBudgets, *, tokens: int, buffers: int
) -> torch.device:
    """The device whose budget bounds the GPU slots (staging for `tokens` taken out first)."""
    return min(
        geometry.devices,
        key=lambda d: _device_room(geometry, d, budgets[d], tokens, buffers),
    )


def gpu_limit(geometry: KVGeometry, budgets: DeviceBudgets, *, tokens: int, buffers: int) -> int:
    """The GPU pool's limit (bytes of whole blocks) under per-device `budgets` while staging holds
    `tokens` positions (0: no staging): `limit // block_bytes` slots fit every device."""
    device = tightest_device(geometry, budgets, tokens=tokens, buffers=buffers)
    return _device_room(geometry, device, budgets[device], tokens, buffers)


def device_min_bytes(
    geometry: KVGeometry, device: torch.device, *, buffers: int, tokens: int = 0
) -> int:
    """The smallest budget of `device` that streams `tokens` positions (at least one block): its
    staging plus its share of MIN_GPU_BLOCKS slots."""
    tokens = max(tokens, geometry.block_tokens)
    staging = device_staging_bytes(geometry, tokens, buffers=buffers)
    return staging + MIN_GPU_BLOCKS * geometry.device_block_bytes(device)


def step_blocks(tokens: int, block_tokens: int) -> int:
    """Blocks one step of `tokens` new positions can touch: it may start mid-block."""
    return math.ceil(tokens / block_tokens) + 1


def min_gpu_bytes(geometry: KVGeometry, *, buffers: int, tokens: int = 0) -> int:
    """The smallest GPU budget that can stream a context of `tokens` positions (at least one
    block): the staging ring for them plus one block slot."""
    tokens = max(tokens, geometry.block_tokens)
    return staging_bytes(geometry, tokens, buffers=buffers) + MIN_GPU_BLOCKS * geometry.block_bytes


def resident_gpu_bytes(geometry: KVGeometry, tokens: int) -> int:
    """The GPU budget that holds a context of `tokens` positions whole (read in place, no
    staging): every block of it."""
    return geometry.blocks_for(tokens) * geometry.block_bytes


def tier_budgets(
    geometry: KVGeometry, total_tokens: int, *, gpu_blocks: int, host_blocks: int, buffers: int
) -> dict[str, int]:
    """Budgets (bytes) leaving `gpu_blocks` on the GPU, `host_blocks` on host, the rest on disk.

    The GPU budget also holds the staging ring for `total_tokens` (give it at least
    MIN_GPU_BLOCKS slots), the host more blocks than one prefill chunk seals. The disk gets
    room for every block twice over plus file headers, so it is never the limit.
    Returns the keyword arguments `gpu_budget`, `host_budget`, `disk_budget` of `load_config`.
    """
    blocks = geometry.blocks_for(total_tokens)
    return {
        "gpu_budget": staging_bytes(geometry, total_tokens, buffers=buffers)
        + gpu_blocks * geometry.block_bytes,
        "host_budget": host_blocks * geometry.block_bytes,
        "disk_budget": 2 * blocks * geometry.block_bytes + (64 << 20),
    }


@dataclass(frozen=True, slots=True)
class DevicePlan:
    """One device's share of a ContextPlan's GPU tier (bytes)."""

    device: torch.device
    layers: int  # tiered layers on it
    budget_bytes: int
    staging_bytes: int
    slot_bytes: int  # its share of the resident blocks
    min_bytes: int  # the smallest budget of this device that streams the context


@dataclass(frozen=True, slots=True)
class ContextPlan:
    """Where a context of `tokens` positions would live under given budgets (bytes, blocks)."""

    tokens: int
    kv_bytes: int
    in_place: bool  # the whole context fits the GPU budget and is read in place
    staging_bytes: int  # GPU bytes of the staging ring (0 in place), every device together
    gpu_blocks: int  # blocks resident on the GPU
    host_blocks: int
    disk_blocks: int
    min_gpu_bytes: int  # the smallest GPU budget (of each device) that streams this context
    streamed_bytes_per_step: int  # bytes copied up from host and disk per decode step
    problem: str | None  # one line saying why it cannot run, or None
    devices: tuple[DevicePlan, ...] = ()  # per device, in first-use order


def plan_context(
    geometry: KVGeometry,
    tokens: int,
    *,
    gpu_budget: int,
    host_budget: int,
    disk_budget: int,
    buffers: int,
    gpu_devices: Mapping[str, int] | None = None,
) -> ContextPlan:
    """Plan `tokens` positions over the tiers: in place if every block fits the GPU budget,
    else streamed (staging + the GPU slots left), the rest on host, then disk.

    `gpu_budget` applies to each device of the geometry, `gpu_devices` (gpu.devices: device
    name -> bytes) overrides it for the devices it names."""
    blocks = geometry.blocks_for(tokens)
    block_bytes = geometry.block_bytes
    budgets = device_budgets(geometry, gpu_budget, gpu_devices)
    in_place = blocks * block_bytes <= gpu_limit(geometry, budgets, tokens=0, buffers=buffers)
    staging_tokens_held = 0 if in_place else tokens
    staging = 0 if in_place else staging_bytes(geometry, tokens, buffers=buffers)
    limit = gpu_limit(geometry, budgets, tokens=staging_tokens_held, buffers=buffers)
    gpu_blocks = blocks if in_place else max(0, min(blocks, limit // block_bytes))
    host_blocks = min(blocks - gpu_blocks, host_budget // block_bytes)
    disk_blocks = blocks - gpu_blocks - host_blocks
    devices = tuple(
        DevicePlan(
            device=device,
            layers=geometry.layers_on(device),
            budget_bytes=budgets[device],
            staging_bytes=staging // len(budgets),
            slot_bytes=gpu_blocks * geometry.device_block_bytes(device),
            min_bytes=device_min_bytes(geometry, device, buffers=buffers, tokens=tokens),
        )
        for device in geometry.devices
    )
    short = [d for d in devices if d.budget_bytes < d.min_bytes]
    problem = None
    if not in_place and short:
        worst = short[0]
        where = "" if geometry.single_device else f" on {worst.device}"
        problem = (
            f"gpu budget {worst.budget_bytes} bytes{where} cannot stream {tokens} tokens: staging "
            f"alone takes {staging // len(budgets)} bytes; need at least {worst.min_bytes} (raise "
            "gpu.budget or lower policy.prefetch_depth)"
        )
    elif disk_blocks * block_bytes > disk_budget:
        problem = (
            f"{tokens} tokens need {blocks * block_bytes} bytes of KV; gpu, host and disk "
            f"budgets hold {(gpu_blocks + host_blocks) * block_bytes + disk_budget}: raise "
            "host.budget or disk.budget"
        )
    streamed = 0 if in_place else (blocks - gpu_blocks) * block_bytes
    return ContextPlan(
        tokens=tokens,
        kv_bytes=geometry.kv_bytes(tokens),
        in_place=in_place,
        staging_bytes=staging,
        gpu_blocks=gpu_blocks,
        host_blocks=host_blocks,
        disk_blocks=disk_blocks,
        min_gpu_bytes=max(d.min_bytes for d in devices),
        streamed_bytes_per_step=streamed,
        problem=problem,
        devices=devices,
    )


def largest_context(
    geometry: KVGeometry,
    *,
    gpu_budget: int,
    host_budget: int,
    disk_budget: int,
    buffers: int,
    gpu_devices: Mapping[str, int] | None = None,
) -> int:
    """The most positions `plan_context` accepts under these budgets (0 if not even one)."""

    def fits(tokens: int) -> bool:
        plan = plan_context(
            geometry,
            tokens,
            gpu_budget=gpu_budget,
            host_budget=host_budget,
            disk_budget=disk_budget,
            buffers=buffers,
            gpu_devices=gpu_devices,
        )
        return plan.problem is None

    low, high = 0, geometry.block_tokens
    while fits(high) and high < 1 << 40:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def spread_blocks(blocks: int) -> tuple[int, int] | None:
    """GPU and host block counts that leave the rest of `blocks` on disk, all three holding
    some: about a third on the GPU (at least MIN_GPU_BLOCKS + 2), at least two (an eighth) on
    disk, the rest on host. None when `blocks` is too few for all three."""
    gpu = max(MIN_GPU_BLOCKS + 2, blocks // 3)
    disk = max(2, blocks // 8)
    host = blocks - gpu - disk
    return None if host < 1 else (gpu, host)


def largest_chunk(gpu_blocks: int, host_blocks: int, block_tokens: int) -> int:
    """The longest prefill chunk a step can take with these slots: its blocks are still open,
    so GPU and host must hold all of them (`step_blocks`); only sealed blocks reach disk."""
    return (gpu_blocks + host_blocks - 1) * block_tokens
