"""The tiers: one TierStore per level (base.py), built from a config by `build_stores`.

GPU and host are slab pools of memory (pool.py, gpu.py, host.py); the disk is a store of block
files (disk/). A new tier is one more TierStore and one more line in `build_stores`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvtier.blocks import Tier
from kvtier.config import Config
from kvtier.layout import KVGeometry, device_budgets, gpu_limit
from kvtier.tiers.base import TierStore
from kvtier.tiers.disk import DiskStore, DiskTier
from kvtier.tiers.gpu import GpuPool
from kvtier.tiers.host import HostPool


def build_stores(
    cfg: Config,
    geometry: KVGeometry,
    *,
    fingerprint: str,
    retire: Callable[[list[torch.Tensor]], None] | None = None,
    disk_store: DiskStore | None = None,
) -> dict[Tier, TierStore]:
    """The tier stores a config asks for, fastest first (the disk only with disk.budget > 0).

    `retire` receives GPU tensors a store replaces (the mover's `retire`)."""
    gpu = gpu_limit(geometry, configured_device_budgets(cfg, geometry), tokens=0, buffers=1)
    stores: dict[Tier, TierStore] = {
        Tier.GPU: GpuPool(geometry, limit_bytes=gpu, retire=retire),
        Tier.HOST: HostPool(
            geometry, limit_bytes=cfg.host.budget_bytes, keep_pinned=cfg.host.keep_pinned
        ),
    }
    owns_store = disk_store is None and cfg.disk.budget_bytes > 0
    if owns_store:
        disk_store = DiskStore(
            cfg.disk.path,
            budget_bytes=cfg.disk.budget_bytes,
            codec=cfg.disk.codec,
            fingerprint=fingerprint,
            model_key=cfg.disk.model_key,
        )
    if disk_store is not None:
        # with admit_after_hits, a block is shared only once reused enough (the controller
        # publishes it then); until then what reaches disk is private
        shared = cfg.disk.persist and cfg.disk.admit_after_hits == 0
        stores[Tier.DISK] = DiskTier(disk_store, geometry, persist=shared, owns_store=owns_store)
    if cfg.remote.spec is not None:  # the slowest: connects now, RemoteError if it cannot
        from kvtier.tiers.remote.tier import RemoteTier

        stores[Tier.REMOTE] = RemoteTier(
            cfg.remote.spec,
            geometry,
            fingerprint=fingerprint,
            persist=cfg.remote.persist,
            model_key=cfg.disk.model_key,
        )
    return stores


def check_servers(cfg: Config) -> None:
    """RemoteError now if the configured remote server rejects us for good (password, host
    name, certificate); a server that is down only warns. Nothing without [remote] url."""
    if cfg.remote.spec is not None:
        from kvtier.tiers.remote.clients import check_now

        check_now(cfg.remote.spec)


def configured_budgets(cfg: Config) -> dict[Tier, int]:
    """The KV budget the config gives each tier, in bytes (the GPU's includes staging, and is
    per device: see `configured_device_budgets`)."""
    return {
        Tier.GPU: cfg.gpu.budget_bytes,
        Tier.HOST: cfg.host.budget_bytes,
        Tier.DISK: cfg.disk.budget_bytes,
        Tier.REMOTE: 0,  # a shared cache, not room: it never holds a block's only copy
    }


def configured_device_budgets(cfg: Config, geometry: KVGeometry) -> dict[torch.device, int]:
    """The GPU budget of each device holding a tiered layer: gpu.budget applies to each one,
    gpu.devices overrides it for the devices it names."""
    return device_budgets(geometry, cfg.gpu.budget_bytes, cfg.gpu.devices)
