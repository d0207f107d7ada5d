"""Configuration: defaults -> TOML file -> KVTIER_* environment -> keyword overrides, later wins.

The schema (one frozen dataclass per TOML table), where each value came from, and validation.
Budgets written as bytes, "2GiB", "40%" or "auto" become ints here, once (parsing in sizes.py,
free memory from machine.py); it never allocates or creates anything.
"""

from __future__ import annotations

import difflib
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn

from kvtier.errors import ConfigError
from kvtier.machine import free_disk_bytes, free_gpu_bytes, free_host_bytes
from kvtier.registry import registered_policies
from kvtier.sizes import parse_percent, parse_size

log = logging.getLogger(__name__)

# Dotted key -> default, in the order of configs/default.toml. One source of truth for the keys.
DEFAULTS: Mapping[str, object] = MappingProxyType(
    {
        "block_tokens": 256,
        "prefill_chunk_tokens": 4096,
        "gpu.budget": "auto",
        "host.budget": "50%",
        "disk.path": "~/.cache/kvtier",
        "disk.budget": "80%",
        "disk.codec": "auto",
        "disk.persist": False,
        "disk.model_key": "",
        "policy.name": "sink_recent",
        "policy.sink_tokens": 64,
        "policy.recent_tokens": 1024,
        "policy.prefetch_depth": 1,
    }
)
TABLES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        table: tuple(key.split(".")[1] for key in DEFAULTS if key.startswith(table + "."))
        for table in ("gpu", "host", "disk", "policy")
    }
)
TOP_LEVEL_KEYS = tuple(key for key in DEFAULTS if "." not in key)
CODECS = ("auto", "raw", "lz4", "shuffle+lz4")
AUTO_BUDGETS: Mapping[str, str] = MappingProxyType({"gpu": "40%", "host": "50%", "disk": "80%"})
MAX_PREFETCH_DEPTH = 8
ENV_VARS: Mapping[str, str] = MappingProxyType(
    {"KVTIER_" + key.upper().replace(".", "_"): key for key in DEFAULTS}
)
ENV_NOT_CONFIG = frozenset({"KVTIER_LOG_LEVEL"})  # read by the CLI, not a config key
OVERRIDE_NAMES: Mapping[str, str] = MappingProxyType({k.replace(".", "_"): k for k in DEFAULTS})

_BUDGET_HINT = "use bytes, '2GiB', '40%' or 'auto'"
_ENV_TRUE = frozenset({"true", "1", "yes"})
_ENV_FALSE = frozenset({"false", "0", "no"})

# Dotted key -> (value as written, source): "default", "file <path>", "env KVTIER_X", "override".
_Layers = dict[str, tuple[object, str]]


@dataclass(frozen=True, slots=True)
class GpuConfig:
    """The GPU tier; with CPU-only torch it is CPU memory."""

    budget_bytes: int


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Pinned host RAM."""

    budget_bytes: int


@dataclass(frozen=True, slots=True)
class DiskConfig:
    """The block store on local disk; budget_bytes == 0 means no disk tier. `path` may not exist."""

    path: Path
    budget_bytes: int
    codec: str
    persist: bool
    # names the model in block ids instead of a checksum of its weights; "" = compute it
    model_key: str = ""


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Which eviction/placement policy runs, and its knobs (tokens, layers ahead)."""

    name: str
    sink_tokens: int
    recent_tokens: int
    prefetch_depth: int


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
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    specs: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def with_overrides(self, **overrides: object) -> Config:
        """A copy re-resolved with `overrides` on top (same names as load_config); percentages are
        measured again against what is free now."""
        resolved = self.resolved()
        layers: _Layers = {
            key: (self.specs.get(key, resolved[key]), self.sources.get(key, "default"))
            for key in DEFAULTS
        }
        layers.update(_read_overrides(overrides))
        return _resolve(layers)

    def resolved(self) -> dict[str, object]:
        """Dotted key -> resolved value (budgets in bytes, disk.path a Path), in DEFAULTS order."""
        out: dict[str, object] = {}
        for key in DEFAULTS:
            table, _, name = key.rpartition(".")
            owner = getattr(self, table) if table else self
            out[key] = getattr(owner, "budget_bytes" if name == "budget" else name)
        return out

    def to_dict(self) -> dict[str, object]:
        """Resolved values nested by table, as the dataclasses name them (budget_bytes, path as
        str), plus "sources" and "specs"; ready for json.dumps."""
        out: dict[str, object] = {}
        for key, value in self.resolved().items():
            table, _, name = key.rpartition(".")
            into = out.setdefault(table, {}) if table else out
            into["budget_bytes" if name == "budget" else name] = (
                str(value) if isinstance(value, Path) else value
            )
        return out | {"sources": dict(self.sources), "specs": dict(self.specs)}


def load_config(path: str | os.PathLike[str] | None = None, **overrides: object) -> Config:
    """Resolve defaults, then the TOML file at `path`, then KVTIER_* env vars, then `overrides`.

    Overrides take flat names (`gpu_budget="2GiB"`) or tables (`gpu={"budget": "2GiB"}`); a None
    value, like an empty KVTIER_* variable, counts as unset. A relative disk.path in a file is
    relative to that file. Raises ConfigError naming the key, the value, its source and the fix.
    """
    layers: _Layers = {key: (value, "default") for key, value in DEFAULTS.items()}
    if path is not None:
        layers.update(_read_file(path))
    layers.update(_read_env(os.environ))
    layers.update(_read_overrides(overrides))
    return _resolve(layers)


def _fail(message: str, source: str) -> NoReturn:
    raise ConfigError(_with_source(message, source))


def _with_source(message: str, source: str) -> str:
    return message if source == "default" else f"{message} (from {source})"


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _read_file(path: str | os.PathLike[str]) -> _Layers:
    file = Path(path).expanduser().absolute()
    try:
        with file.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {file} does not exist; pass an existing TOML file "
            "(configs/default.toml lists every key) or no file for the defaults"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"config file {file} is not valid TOML: {exc}; configs/default.toml shows the format"
        ) from None
    return _flatten(data, f"file {file}")


def _flatten(data: Mapping[str, object], source: str) -> _Layers:
    tables = ", ".join(f"[{name}]" for name in TABLES)
    out: _Layers = {}
    for name, value in data.items():
        if name in TOP_LEVEL_KEYS:
            out[name] = (value, source)
        elif name in TABLES:
            keys = ", ".join(TABLES[name])
            if not isinstance(value, Mapping):
                _fail(f"{name} = {value!r} is not a table; write [{name}] with keys {keys}", source)
            for sub, sub_value in value.items():
                if sub not in TABLES[name]:
                    hint = _did_you_mean(sub, list(TABLES[name]))
                    _fail(f"unknown key '{name}.{sub}'; {hint}[{name}] takes: {keys}", source)
                if sub_value is not None:
                    out[f"{name}.{sub}"] = (sub_value, source)
        else:
            kind = "table" if isinstance(value, Mapping) else "key"
            hint = _did_you_mean(name, [*TOP_LEVEL_KEYS, *TABLES])
            allowed = f"keys are {', '.join(TOP_LEVEL_KEYS)} and the tables {tables}"
            _fail(f"unknown {kind} {name!r}; {hint}{allowed}", source)
    return out


def _read_env(environ: Mapping[str, str]) -> _Layers:
    out: _Layers = {}
    for name in sorted(environ):
        if not name.startswith("KVTIER_") or name in ENV_NOT_CONFIG:
            continue
        key = ENV_VARS.get(name)
        if key is None:
            hint = _did_you_mean(name, list(ENV_VARS))
            raise ConfigError(
                f"unknown environment variable {name}; {hint}kvtier reads "
                f"{', '.join(ENV_VARS)} and KVTIER_LOG_LEVEL; unset it or fix its name"
            )
        if environ[name].strip():  # KVTIER_X= (empty) is the shell's way of saying "unset"
            out[key] = (environ[name], f"env {name}")
    return out


def _read_overrides(overrides: Mapping[str, object]) -> _Layers:
    out: _Layers = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name in OVERRIDE_NAMES:
            out[OVERRIDE_NAMES[name]] = (value, "override")
        elif name in TABLES:
            out.update(_flatten({name: value}, "override"))
        else:
            hint = _did_you_mean(name, [*OVERRIDE_NAMES, *TABLES])
            raise ConfigError(
                f"unknown override {name!r}; {hint}use one of {', '.join(OVERRIDE_NAMES)} "
                f"or a table such as gpu={{'budget': '2GiB'}}"
            )
    return out


def _resolve(layers: _Layers) -> Config:
    disk_path = _path(layers, "disk.path")
    disk_budget = _budget(layers, "disk.budget", lambda: free_disk_bytes(disk_path))
    if disk_budget > 0 and disk_path.exists() and not disk_path.is_dir():
        _fail(f"disk.path = '{disk_path}' is a file; use a directory", layers["disk.path"][1])
    depth_range = f"an integer from 0 to {MAX_PREFETCH_DEPTH} (e.g. 1)"
    specs = {key: layers[key][0] for key in DEFAULTS}
    specs["disk.path"] = os.fspath(specs["disk.path"])  # a Path override: keep specs JSON-ready
    return Config(
        block_tokens=_int(layers, "block_tokens", "a positive multiple of 16 (e.g. 256)", 16, 16),
        prefill_chunk_tokens=_int(
            layers, "prefill_chunk_tokens", "a positive integer (e.g. 4096)", 1
        ),
        gpu=GpuConfig(budget_bytes=_budget(layers, "gpu.budget", free_gpu_bytes)),
        host=HostConfig(budget_bytes=_budget(layers, "host.budget", free_host_bytes)),
        disk=DiskConfig(
            path=disk_path,
            budget_bytes=disk_budget,
            codec=_codec(layers),
            persist=_bool(layers, "disk.persist"),
            model_key=_model_key(layers),
        ),
        policy=PolicyConfig(
            name=_policy_name(layers),
            sink_tokens=_int(layers, "policy.sink_tokens", "an integer >= 0 (e.g. 64)", 0),
            recent_tokens=_int(layers, "policy.recent_tokens", "an integer >= 0 (e.g. 1024)", 0),
            prefetch_depth=_int(
                layers, "policy.prefetch_depth", depth_range, 0, maximum=MAX_PREFETCH_DEPTH
            ),
        ),
        sources=MappingProxyType({key: layers[key][1] for key in DEFAULTS}),
        specs=MappingProxyType(specs),
    )


def _int(
    layers: _Layers,
    key: str,
    allowed: str,
    minimum: int,
    multiple: int = 1,
    maximum: int | None = None,
) -> int:
    value, source = layers[key]
    number = value
    if source.startswith("env ") and isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int):
        _fail(f"{key} = {value!r} is not {allowed}", source)
    if number < minimum or number % multiple or (maximum is not None and number > maximum):
        _fail(f"{key} = {value!r} is not {allowed}", source)
    return number


def _bool(layers: _Layers, key: str) -> bool:
    value, source = layers[key]
    if isinstance(value, bool):
        return value
    if source.startswith("env ") and isinstance(value, str):
        word = value.strip().lower()
        if word in _ENV_TRUE | _ENV_FALSE:
            return word in _ENV_TRUE
        _fail(f"{key} = {value!r} is not a boolean; use true/false, 1/0 or yes/no", source)
    _fail(f"{key} = {value!r} is not a boolean; use true or false", source)


def _model_key(layers: _Layers) -> str:
    value, source = layers["disk.model_key"]
    if not isinstance(value, str) or value != value.strip():
        _fail(
            f"disk.model_key = {value!r} is not a model name; use e.g. 'org/model@rev' or ''",
            source,
        )
    return value


def _codec(layers: _Layers) -> str:
    value, source = layers["disk.codec"]
    if value not in CODECS:
        _fail(f"disk.codec = {value!r} is not a codec; use one of {', '.join(CODECS)}", source)
    return str(value)


def _policy_name(layers: _Layers) -> str:
    value, source = layers["policy.name"]
    names = registered_policies()
    if value not in names:
        _fail(
            f"policy.name = {value!r} is not a registered policy; registered: "
            f"{', '.join(sorted(names))}; register yours with kvtier.register_policy(name) "
            "before load_config",
            source,
        )
    return str(value)


def _path(layers: _Layers, key: str) -> Path:
    value, source = layers[key]
    if not isinstance(value, str | os.PathLike) or not str(os.fspath(value)).strip():
        _fail(f"{key} = {value!r} is not a path; use a directory such as '~/.cache/kvtier'", source)
    path = Path(value).expanduser()
    if not path.is_absolute():
        base = Path(source.removeprefix("file ")).parent if source.startswith("file ") else None
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


def _budget(layers: _Layers, key: str, free: Callable[[], int]) -> int:
    value, source = layers[key]
    tier = key.split(".")[0]
    spec = value
    if isinstance(value, str) and value.strip().lower() == "auto":
        spec = AUTO_BUDGETS[tier]
    if isinstance(spec, str) and spec.strip().endswith("%"):
        percent = _sized(parse_percent, spec, key=key, hint=_BUDGET_HINT, source=source)
        if not 0 < percent <= 100:
            off = " (disk.budget = 0 turns the disk tier off)" if tier == "disk" else ""
            _fail(f"{key} = {value!r} is not a percentage above 0% and at most 100%{off}", source)
        available = free()
        budget = int(Decimal(available) * percent / 100)
        how = f" ({percent}% of {available} bytes free)"
    else:
        budget = _sized(parse_size, value, key=key, hint=_BUDGET_HINT, source=source)
        how = ""
    if budget == 0 and tier != "disk":
        _fail(
            f"{key} = {value!r} resolves to 0 bytes{how}; the {tier} tier needs room: use a size "
            "like '2GiB', a percentage like '40%' or 'auto' (only disk.budget may be 0)",
            source,
        )
    if budget == 0 and how:
        log.warning(
            "disk.budget = %r resolved to 0 bytes%s; running without a disk tier", value, how
        )
    log.debug("%s = %r resolved to %d bytes%s", key, value, budget, how)
    return budget


def _sized(parse: Callable[..., object], value: object, *, key: str, hint: str, source: str):
    """`parse(value, key=, hint=)` with the value's source added to a ConfigError."""
    try:
        return parse(value, key=key, hint=hint)
    except ConfigError as error:
        raise ConfigError(_with_source(str(error), source)) from None
