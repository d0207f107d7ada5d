"""KV geometry and the budget planner: the one home of every byte count kvtier derives.

`KVGeometry` says what one position of one tiered layer weighs; the functions below turn it into
staging bytes, the smallest GPU budget that can make progress, and per-tier budgets. The
controller, the demo and the tests all call these (and `kvtier plan` will); nothing else
repeats them.
"""

from __future__ import annotations

import dataclasses
import math
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


def staging_bytes(geometry: KVGeometry, tokens: int, *, buffers: int) -> int:
    """GPU bytes of the staging ring assembling `tokens` positions: `buffers` position-ordered
    buffers of one layer per device (buffers = prefetch_depth + 1)."""
    per_buffer = staging_tokens(geometry, tokens) * geometry.token_bytes
    return len(geometry.devices) * buffers * per_buffer


def step_blocks(tokens: int, block_tokens: int) -> int:
    """Blocks one step of `tokens` new positions can touch: it may start mid-block."""
    return math.ceil(tokens / block_tokens) + 1


# A step's new positions are written into staging (what attention reads) and into their blocks,
# which are born on host when the GPU has no room: so the GPU needs staging and one slot, no more
MIN_GPU_BLOCKS = 1


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
class ContextPlan:
    """Where a context of `tokens` positions would live under given budgets (bytes, blocks)."""

    tokens: int
    kv_bytes: int
    in_place: bool  # the whole context fits the GPU budget and is read in place
    staging_bytes: int  # GPU bytes of the staging ring (0 in place)
    gpu_blocks: int  # blocks resident on the GPU
    host_blocks: int
    disk_blocks: int
    min_gpu_bytes: int  # the smallest GPU budget that streams this context
    streamed_bytes_per_step: int  # bytes copied up from host and disk per decode step
    problem: str | None  # one line saying why it cannot run, or None


def plan_context(
    geometry: KVGeometry,
    tokens: int,
    *,
    gpu_budget: int,
    host_budget: int,
    disk_budget: int,
    buffers: int,
) -> ContextPlan:
    """Plan `tokens` positions over the tiers: in place if every block fits the GPU budget,
    else streamed (staging + the GPU slots left), the rest on host, then disk."""
    blocks = geometry.blocks_for(tokens)
    block_bytes = geometry.block_bytes
    need_gpu = min_gpu_bytes(geometry, buffers=buffers, tokens=tokens)
    in_place = blocks * block_bytes <= gpu_budget
    staging = 0 if in_place else staging_bytes(geometry, tokens, buffers=buffers)
    gpu_blocks = blocks if in_place else max(0, min(blocks, (gpu_budget - staging) // block_bytes))
    host_blocks = min(blocks - gpu_blocks, host_budget // block_bytes)
    disk_blocks = blocks - gpu_blocks - host_blocks
    problem = None
    if not in_place and gpu_budget < need_gpu:
        problem = (
            f"gpu budget {gpu_budget} bytes cannot stream {tokens} tokens: staging alone takes "
            f"{staging} bytes; need at least {need_gpu} (raise gpu.budget or lower "
            "policy.prefetch_depth)"
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
        min_gpu_bytes=need_gpu,
        streamed_bytes_per_step=streamed,
        problem=problem,
    )


def largest_context(
    geometry: KVGeometry, *, gpu_budget: int, host_budget: int, disk_budget: int, buffers: int
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
