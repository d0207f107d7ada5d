"""Plan a model's context from its config alone: KV geometry, blocks per tier, step time, limits.

`kvtier plan` and `kvtier run` (before it loads any weight) call `plan_model`; the byte rules
are kvtier.layout's. Reads config files and the saved bench results; never loads weights and
never allocates KV.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvtier.blocks import Tier
from kvtier.config import Config
from kvtier.controller import costs
from kvtier.errors import BudgetError, KVTierError
from kvtier.hf.shape import KVShape, kv_shape, read_config
from kvtier.layout import ContextPlan, DevicePlan, KVGeometry, largest_context, plan_context
from kvtier.measured import Speed, copy_speed, disk_speeds
from kvtier.zoo import config_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class StepTime:
    """The copies one decode step makes to stream what is not on the GPU, and their time.

    A floor for the step, not its length: the model's own compute is not in it."""

    seconds: float
    host_bytes: int  # copied up from the host tier
    disk_bytes: int  # read from disk, then copied up
    copy: Speed  # host -> GPU (pinned H2D; a memory copy on a CPU-only machine)
    disk_read: Speed


@dataclass(frozen=True, slots=True)
class RemotePlan:
    """The remote tier beside the others: a shared cache of sealed blocks, never a block's only
    copy, so it adds no room to the plan; what loading the context's stored prefix would take."""

    url: str  # redacted: no password, no HMAC key
    blocks: int  # whole blocks of the context, the part a stored prefix can cover
    load_s: float  # those blocks from the server into the cache, at `gbps`
    gbps: float
    source: str  # where `gbps` comes from


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """Where a context of `plan.tokens` positions of `model` would live under `budgets`."""

    model: str
    config_dir: Path
    shape: KVShape
    geometry: KVGeometry
    budgets: dict[str, int]  # "gpu", "host", "disk": bytes, as the config resolved them
    buffers: int  # staging buffers: policy.prefetch_depth + 1
    plan: ContextPlan
    largest_tokens: int
    step: StepTime
    remote: RemotePlan | None = None  # with a [remote] url

    @property
    def tier_tokens(self) -> dict[str, int]:
        """Tokens per tier: whole blocks, the last (partial) block in the slowest tier used."""
        left, out = self.plan.tokens, {}
        for name, blocks in (
            ("gpu", self.plan.gpu_blocks),
            ("host", self.plan.host_blocks),
            ("disk", self.plan.disk_blocks),
        ):
            out[name] = min(left, blocks * self.geometry.block_tokens)
            left -= out[name]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the model's KV shape, budgets, the plan, the step time and its sources."""
        g, p, s = self.geometry, self.plan, self.step
        return {
            "model": self.model,
            "config_dir": str(self.config_dir),
            "model_type": self.shape.model_type,
            "layers": len(self.shape.sliding_windows),
            "tiered_layers": len(self.shape.tiered_layers),
            "kv_heads": self.shape.kv_heads,
            "head_dim": self.shape.head_dim,
            "dtype": str(g.dtype).removeprefix("torch."),
            "batch": g.batch,
            "block_tokens": g.block_tokens,
            "block_bytes": g.block_bytes,
            "kv_bytes_per_token": g.kv_bytes(1),
            "budgets": dict(self.budgets),
            "buffers": self.buffers,
            "tokens": p.tokens,
            "kv_bytes": p.kv_bytes,
            "in_place": p.in_place,
            "staging_bytes": p.staging_bytes,
            "min_gpu_bytes": p.min_gpu_bytes,
            "blocks": {"gpu": p.gpu_blocks, "host": p.host_blocks, "disk": p.disk_blocks},
            "tokens_per_tier": self.tier_tokens,
            "streamed_bytes_per_step": p.streamed_bytes_per_step,
            "step_s": s.seconds,
            "step_sources": {"copy": s.copy.source, "disk_read": s.disk_read.source},
            "copy_gbps": s.copy.gbps,
            "disk_read_gbps": s.disk_read.gbps,
            "largest_tokens": self.largest_tokens,
            "problem": p.problem,
        } | (
            ({} if g.single_device else {"devices": [_device_dict(d) for d in p.devices]})
            | ({} if self.remote is None else {"remote": _remote_dict(self.remote)})
        )


def _remote_dict(row: RemotePlan) -> dict[str, Any]:
    return {
        "url": row.url,
        "blocks": row.blocks,
        "load_s": row.load_s,
        "gbps": row.gbps,
        "source": row.source,
    }


def _device_dict(row: DevicePlan) -> dict[str, Any]:
    return {
        "device": str(row.device),
        "tiered_layers": row.layers,
        "budget_bytes": row.budget_bytes,
        "staging_bytes": row.staging_bytes,
        "slot_bytes": row.slot_bytes,
        "min_bytes": row.min_bytes,
    }


def default_dtype() -> torch.dtype:
    """What `kvtier run` and zoo.load use: bfloat16 on CUDA, float32 on a CPU."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def split_devices(layers: int, gpus: int) -> tuple[torch.device, ...]:
    """Devices of `layers` decoder layers split evenly over `gpus` GPUs in order, as accelerate's
    device_map="auto" does for equal layers: the first `layers % gpus` GPUs take one more."""
    share, extra = divmod(layers, gpus)
    devices: list[torch.device] = []
    for index in range(gpus):
        devices += [torch.device("cuda", index)] * (share + (index < extra))
    return tuple(devices)


def geometry_for(
    shape: KVShape, *, batch: int, dtype: torch.dtype, block_tokens: int, gpus: int = 0
) -> KVGeometry:
    """The tiered KV geometry of `shape` on one device (GPU 0, else the CPU), or with `gpus` > 0
    its decoder layers split over that many GPUs (`split_devices`)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    layer_devices = (device,) * len(shape.sliding_windows)
    if gpus > 0:
        layer_devices = split_devices(len(shape.sliding_windows), gpus)
    return KVGeometry(
        layer_ids=shape.tiered_layers,
        layer_devices=tuple(layer_devices[i] for i in shape.tiered_layers),
        batch=batch,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        dtype=dtype,
        block_tokens=block_tokens,
    )


def plan_model(
    model: str,
    cfg: Config,
    *,
    tokens: int,
    batch: int = 1,
    dtype: torch.dtype | None = None,
    gpus: int = 0,
) -> ModelPlan:
    """Plan `tokens` positions of MODEL (a zoo name, a directory, a cached hub id) under cfg's
    budgets from its config alone; `gpus` > 0 splits its layers over that many GPUs (gpu.budget
    then applies to each). A plan that cannot run has `plan.problem` set; `require` turns it
    into a BudgetError."""
    if tokens < 1 or batch < 1 or gpus < 0:
        raise KVTierError(f"plan needs a context and batch of at least 1, got {tokens}, {batch}")
    directory = config_dir(model)
    shape = kv_shape(read_config(directory))
    if not shape.tiered_layers:
        raise KVTierError(
            f"{model} has only sliding-window layers: its KV is bounded and stays on the GPU, "
            "so kvtier has nothing to plan"
        )
    geometry = geometry_for(
        shape, batch=batch, dtype=dtype or default_dtype(), block_tokens=cfg.block_tokens, gpus=gpus
    )
    budgets = {
        "gpu": cfg.gpu.budget_bytes,
        "host": cfg.host.budget_bytes,
        "disk": cfg.disk.budget_bytes,
    }
    buffers = cfg.policy.prefetch_depth + 1
    sizes = {f"{name}_budget": value for name, value in budgets.items()}
    sizes["gpu_devices"] = cfg.gpu.devices
    plan = plan_context(geometry, tokens, buffers=buffers, **sizes)
    largest = largest_context(geometry, buffers=buffers, **sizes)
    step = step_time(geometry, plan, cfg)
    remote = remote_plan(geometry, plan, cfg)
    return ModelPlan(
        model, directory, shape, geometry, budgets, buffers, plan, largest, step, remote
    )


def remote_plan(geometry: KVGeometry, plan: ContextPlan, cfg: Config) -> RemotePlan | None:
    """The remote tier's line of the plan (None without a [remote] url). Its speed is the
    cost model's: a plan connects to nothing, so it is what `kvtier bench` measured on this
    server, else the assumed figure (docs/remote.md has measured ones)."""
    spec = cfg.remote.spec
    if spec is None:
        return None
    blocks = plan.tokens // geometry.block_tokens
    speeds = costs.bandwidths(
        cuda=torch.cuda.is_available(),
        layer_bytes=geometry.layer_block_bytes,
        disk_path=cfg.disk.path,
        remote_spec=spec,
    )
    gbps = speeds.gbps[Tier.REMOTE]
    per_block = costs.BLOCK_OVERHEAD_S[Tier.REMOTE] + geometry.block_bytes / (gbps * 1e9)
    return RemotePlan(
        spec.redacted(), blocks, blocks * per_block, gbps, speeds.sources[Tier.REMOTE]
    )


def step_time(geometry: KVGeometry, plan: ContextPlan, cfg: Config) -> StepTime:
    """Seconds of the copies one decode step streams: host blocks copied up, disk blocks read
    then copied up, one block-layer per copy (the worst case of the coalescing), no overlap."""
    host_bytes = plan.host_blocks * geometry.block_bytes
    disk_bytes = plan.disk_blocks * geometry.block_bytes
    kind = "pinned_h2d" if torch.cuda.is_available() else "host_memcpy"
    copy = copy_speed(geometry.layer_block_bytes, kind=kind)
    disk_read = disk_speeds(cfg.disk.path).read
    if plan.in_place:
        return StepTime(0.0, 0, 0, copy, disk_read)
    seconds = (host_bytes + disk_bytes) / (copy.gbps * 1e9) + disk_bytes / (disk_read.gbps * 1e9)
    return StepTime(seconds, host_bytes, disk_bytes, copy, disk_read)


def require(model_plan: ModelPlan) -> None:
    """Raise BudgetError with the plan's one-line problem, if it has one."""
    problem = model_plan.plan.problem
    if problem is not None:
        largest = model_plan.largest_tokens
        raise BudgetError(
            f"{model_plan.model}: {problem}; under these budgets at most {largest} tokens fit"
        )
