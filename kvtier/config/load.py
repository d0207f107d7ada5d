"""The schema (one frozen dataclass per TOML table), `load_config`, and the assembly of a Config.

Layers from sources.py are resolved key by key with values.py; free memory comes from machine.py.
It never allocates or creates anything.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from kvtier.config.devices import PREFIX as DEVICE_PREFIX
from kvtier.config.devices import as_device_budgets, device_keys
from kvtier.config.keys import DEFAULTS, MAX_PREFETCH_DEPTH, Layers
from kvtier.config.policies import as_policy_module, as_policy_name, as_policy_settings
from kvtier.config.remote import RemoteConfig, as_remote
from kvtier.config.sources import read_env, read_file, read_overrides
from kvtier.config.values import (
    as_admit_after_hits,
    as_bool,
    as_budget,
    as_codec,
    as_int,
    as_model_key,
    as_path,
    check_store,
    disk_free,
    parse_budget,
)
from kvtier.errors import printable
from kvtier.machine import free_gpu_bytes, free_host_bytes

_GPU_FREE = "free GPU memory (available RAM without a GPU)"


@dataclass(frozen=True, slots=True)
class GpuConfig:
    """The GPU tier; with CPU-only torch it is CPU memory.

    `budget_bytes` applies to each device holding tiered layers; `devices` ([gpu.devices]) maps
    a device name ("cuda:1") to its own budget instead."""

    budget_bytes: int
    devices: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}), hash=False)


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Pinned host RAM."""

    budget_bytes: int
    keep_pinned: bool = True  # closed caches' pinned slabs serve the next cache (tiers/host.py)


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """The block store on local disk; budget_bytes == 0 means no disk tier. `path` may not exist."""

    path: Path
    budget_bytes: int
    codec: str
    persist: bool
    # names the model in block ids instead of a checksum of its weights; "" = compute it
    model_key: str = ""
    # with persist: blocks are shared once reused this many times in the process (0: at once)
    admit_after_hits: int = 0


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Which eviction/placement policy runs, and its knobs (tokens, layers ahead).

    `module` is what load_config imported first (a dotted name or a .py file's absolute path;
    "" for none); `settings` are the policy's own, from `[policy.<name>]` over the defaults it
    declares (`Policy.settings`).
    """

    name: str
    sink_tokens: int
    recent_tokens: int
    prefetch_depth: int
    module: str = ""
    settings: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}), hash=False)


@dataclass(frozen=True, slots=True)
class Config:
    """A resolved configuration: every size is bytes. Equality ignores `sources` and `specs`.

    `sources` maps each dotted key to "default", "file <path>", "env KVTIER_X" or "override";
    `specs` maps it to the value as written (e.g. "auto"), before resolution.
    """

    block_tokens: int
    prefill_chunk_tokens: int
    gpu: GpuConfig
    host: HostConfig
    disk: DiskConfig
    policy: PolicyConfig
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    specs: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def with_overrides(self, **overrides: object) -> Config:
        """A copy re-resolved with `overrides` on top (same names as load_config); percentages are
        measured again against what is free now."""
        resolved = self.resolved()
        layers: Layers = {
            key: (self.specs.get(key, resolved.get(key)), self.sources.get(key, "default"))
            for key in dict.fromkeys([*DEFAULTS, *self.specs, *resolved])
        }
        layers.update(read_overrides(overrides))
        return _resolve(layers)

    def resolved(self) -> dict[str, object]:
        """Dotted key -> resolved value (budgets in bytes, disk.path a Path), in DEFAULTS order,
        then the policy's settings as "policy.<name>.<setting>"."""
        out: dict[str, object] = {}
        for key in DEFAULTS:
            table, _, name = key.rpartition(".")
            owner = getattr(self, table) if table else self
            out[key] = getattr(owner, "budget_bytes" if name == "budget" else name)
        for name, value in self.gpu.devices.items():
            out[DEVICE_PREFIX + name] = value
        for name, value in self.policy.settings.items():
            out[f"policy.{self.policy.name}.{name}"] = value
        return out

    def to_dict(self) -> dict[str, object]:
        """Resolved values nested by table, as the dataclasses name them (budget_bytes, path as
        str, policy settings under policy.settings), plus "sources" and "specs"; for json.dumps."""
        out: dict[str, object] = {}
        for key in DEFAULTS:
            value = self.resolved()[key]
            table, _, name = key.rpartition(".")
            into = out.setdefault(table, {}) if table else out
            into["budget_bytes" if name == "budget" else name] = (
                str(value) if isinstance(value, Path) else value
            )
        out["gpu"]["devices"] = dict(self.gpu.devices)
        out["policy"]["settings"] = dict(self.policy.settings)
        return out | {"sources": dict(self.sources), "specs": dict(self.specs)}


def load_config(path: str | os.PathLike[str] | None = None, **overrides: object) -> Config:
    """Resolve defaults, then the TOML file at `path`, then KVTIER_* env vars, then `overrides`.

    Overrides take flat names (`gpu_budget="2GiB"`) or tables (`gpu={"budget": "2GiB"}`); a None
    value, like an empty KVTIER_* variable, counts as unset. A relative disk.path in a file is
    relative to that file. `[policy] module` is imported before the policy name is looked up.
    An unknown KVTIER_* variable is an error (a typo must not pass silently). Raises
    ConfigError, one line naming the key, the value, its source and the fix.
    """
    return resolve(path, environ=os.environ, overrides=overrides)


def resolve(
    path: object = None,
    *,
    environ: Mapping[str, str],
    overrides: Mapping[str, object] | None = None,
    ignore_env: Collection[str] = (),
) -> Config:
    """`load_config` with the environment given, and the KVTIER_* names in `ignore_env` skipped
    (`kvtier info` warns about unknown ones instead of failing)."""
    layers: Layers = {key: (value, "default") for key, value in DEFAULTS.items()}
    if path is not None:
        layers.update(read_file(path))
    layers.update(read_env(environ, ignore=ignore_env))
    layers.update(read_overrides(overrides or {}))
    return _resolve(layers)


def _resolve(layers: Layers) -> Config:
    disk_path = as_path(layers, "disk.path")
    if parse_budget(layers, "disk.budget") != 0:  # before measuring: /proc has 0 bytes free
        check_store(layers, disk_path)
    disk_budget = as_budget(
        layers,
        "disk.budget",
        lambda: disk_free(layers, disk_path),
        f"disk free for {printable(disk_path)}",
    )
    depth_range = f"an integer from 0 to {MAX_PREFETCH_DEPTH} (e.g. 1)"
    module = as_policy_module(layers)  # first: it registers the policies named below
    name = as_policy_name(layers, module)
    settings = as_policy_settings(layers, name)
    settings_keys = [key for key in layers if key.startswith("policy.") and key.count(".") > 1]
    keys = [*DEFAULTS, *device_keys(layers), *settings_keys]
    specs = {key: layers[key][0] for key in keys}
    specs["disk.path"] = os.fspath(specs["disk.path"])  # a Path override: keep specs JSON-ready
    return Config(
        block_tokens=as_int(layers, "block_tokens", "a positive multiple of 16 (e.g. 256)", 16, 16),
        prefill_chunk_tokens=as_int(
            layers, "prefill_chunk_tokens", "a positive integer (e.g. 4096)", 1
        ),
        gpu=GpuConfig(
            budget_bytes=as_budget(layers, "gpu.budget", free_gpu_bytes, _GPU_FREE),
            devices=as_device_budgets(layers),
        ),
        host=HostConfig(
            budget_bytes=as_budget(layers, "host.budget", free_host_bytes, "available RAM"),
            keep_pinned=as_bool(layers, "host.keep_pinned"),
        ),
        disk=DiskConfig(
            path=disk_path,
            budget_bytes=disk_budget,
            codec=as_codec(layers),
            persist=as_bool(layers, "disk.persist"),
            model_key=as_model_key(layers),
            admit_after_hits=as_admit_after_hits(layers),
        ),
        policy=PolicyConfig(
            name=name,
            sink_tokens=as_int(layers, "policy.sink_tokens", "an integer >= 0 (e.g. 64)", 0),
            recent_tokens=as_int(layers, "policy.recent_tokens", "an integer >= 0 (e.g. 1024)", 0),
            prefetch_depth=as_int(
                layers, "policy.prefetch_depth", depth_range, 0, maximum=MAX_PREFETCH_DEPTH
            ),
            module=module,
            settings=settings,
        ),
        remote=as_remote(layers),
        sources=MappingProxyType({key: layers[key][1] for key in keys}),
        specs=MappingProxyType(specs),
    )
