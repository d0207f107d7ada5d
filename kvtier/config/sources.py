"""Where config values come from: the TOML file, KVTIER_* variables and keyword overrides.

Each source becomes layers (dotted key -> (value as written, source)); nothing is validated here
beyond the names of keys and tables. The messages helpers name the source of a bad value.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import NoReturn

from kvtier.config.keys import (
    ENV_NOT_CONFIG,
    ENV_VARS,
    OVERRIDE_NAMES,
    TABLES,
    TOP_LEVEL_KEYS,
    Layers,
)
from kvtier.errors import ConfigError, printable, shown

_MAX_FILE_BYTES = 1 << 20  # a kvtier config is a few KB; more means the wrong file (/dev/zero)


def fail(message: str, source: str) -> NoReturn:
    raise ConfigError(with_source(message, source))


def with_source(message: str, source: str) -> str:
    return message if source == "default" else f"{message} (from {printable(source)})"


def did_you_mean(name: object, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1) if isinstance(name, str) else []
    return f"did you mean {close[0]!r}? " if close else ""


def read_file(path: object) -> Layers:
    """The layers of the TOML file at `path` (a str or os.PathLike); ConfigError if unreadable."""
    file = _config_file(path)
    try:
        with file.open("rb") as stream:
            raw = stream.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {printable(file)} does not exist; pass an existing TOML file "
            "(`kvtier config init PATH` writes configs/default.toml: every key) or no file"
        ) from None
    except (OSError, ValueError) as exc:  # ValueError: a name the file system cannot encode
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot read config file {printable(file)}: {reason}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(
            f"config file {printable(file)} is larger than 1 MiB; a kvtier config is a few KB of TOML "
            "(is it the right file?)"
        )
    return flatten(_parse_toml(raw, file), f"file {file}")


def _config_file(path: object) -> Path:
    name = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(name, str):
        raise ConfigError(
            f"load_config(path) takes a TOML file path (str or os.PathLike), not "
            f"{type(path).__name__} {shown(path)}; pass the path as a str, or None for the defaults"
        )
    if "\0" in name:
        raise ConfigError(f"config file path {shown(name)} contains a NUL byte; remove it")
    try:
        return Path(name).expanduser().absolute()
    except RuntimeError as exc:  # "~nosuchuser/x.toml": no such user, or no home directory
        raise ConfigError(f"config file path {shown(name)}: {exc}; write the full path") from None


def _parse_toml(raw: bytes, file: Path) -> dict[str, object]:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problem = f"is not valid TOML: {exc}; `kvtier config init PATH` shows the format"
    except RecursionError:
        problem = "nests arrays or tables too deeply to read; kvtier's tables are one level deep"
    except ValueError:  # tomllib's int(): more than sys.get_int_max_str_digits() digits
        problem = "holds an integer too long to read (thousands of digits); sizes are at most 8 EiB"
    raise ConfigError(f"config file {printable(file)} {problem}")


def quoted(key: object) -> str:
    """A key name for a message: 'gpu.budget', or its repr when odd (not a str, a newline)."""
    return f"'{key}'" if isinstance(key, str) and key == printable(key) else shown(key)


def flatten(data: Mapping[object, object], source: str) -> Layers:
    """Layers of a TOML document or an override table: "table.key" for each key of a known
    table, "policy.<name>.<setting>" for each key of a [policy.<name>] table (checked later,
    once the policy module is imported)."""
    tables = ", ".join(f"[{name}]" for name in TABLES)
    out: Layers = {}
    for name, value in data.items():
        if name in TOP_LEVEL_KEYS:
            out[name] = (value, source)
        elif name in TABLES:
            out.update(_flatten_table(name, value, source))
        else:
            kind = "table" if isinstance(value, Mapping) else "key"
            hint = did_you_mean(name, [*TOP_LEVEL_KEYS, *TABLES])
            allowed = f"keys are {', '.join(TOP_LEVEL_KEYS)} and the tables {tables}"
            fail(f"unknown {kind} {quoted(name)}; {hint}{allowed}", source)
    return out


def _flatten_table(name: str, value: object, source: str) -> Layers:
    keys = ", ".join(TABLES[name])
    if not isinstance(value, Mapping):
        fail(f"{name} = {shown(value)} is not a table; write [{name}] with keys {keys}", source)
    out: Layers = {}
    for sub, sub_value in value.items():
        if name == "policy" and isinstance(sub, str) and isinstance(sub_value, Mapping):
            if sub not in TABLES[name]:  # [policy.<name>]: that policy's own settings
                for setting, setting_value in sub_value.items():
                    if not isinstance(setting, str):
                        fail(f"unknown key {shown(setting)} in [policy.{sub}]", source)
                    if setting_value is not None:
                        out[f"policy.{sub}.{setting}"] = (setting_value, source)
                continue
        if name == "gpu" and sub == "devices":  # [gpu.devices]: a budget per device
            out.update(_device_table(sub_value, source))
            continue
        if sub not in TABLES[name]:
            hint = did_you_mean(sub, list(TABLES[name]))
            what = quoted(f"{name}.{sub}") if isinstance(sub, str) else f"{shown(sub)} in [{name}]"
            more = {
                "policy": ", or a [policy.<name>] table of settings",
                "gpu": ", or a [gpu.devices] table of budgets per device",
            }.get(name, "")
            fail(f"unknown key {what}; {hint}[{name}] takes: {keys}{more}", source)
        if sub_value is not None:
            out[f"{name}.{sub}"] = (sub_value, source)
    return out


def _device_table(value: object, source: str) -> Layers:
    if not isinstance(value, Mapping):
        fail(
            f"gpu.devices = {shown(value)} is not a table; write [gpu.devices] with a budget per "
            'device, e.g. "cuda:1" = "4GiB"',
            source,
        )
    out: Layers = {}
    for device, budget in value.items():
        if not isinstance(device, str):
            fail(f"unknown device {shown(device)} in [gpu.devices]; name it like 'cuda:1'", source)
        if budget is not None:
            out[f"gpu.devices.{device}"] = (budget, source)
    return out


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """The KVTIER_* names in `environ` that are no config key (and not KVTIER_LOG_LEVEL)."""
    return sorted(
        name
        for name in environ
        if name.startswith("KVTIER_") and name not in ENV_VARS and name not in ENV_NOT_CONFIG
    )


def unknown_env_message(name: str) -> str:
    hint = did_you_mean(name, list(ENV_VARS))
    return (
        f"unknown environment variable {printable(name)}; {hint}unset it or fix its name "
        "(names are KVTIER_ + the key, e.g. KVTIER_GPU_BUDGET)"
    )


def read_env(environ: Mapping[str, str], *, ignore: Collection[str] = ()) -> Layers:
    """Layers of the KVTIER_* variables; an unknown one raises ConfigError unless in `ignore`."""
    out: Layers = {}
    for name in sorted(environ):
        if not name.startswith("KVTIER_") or name in ENV_NOT_CONFIG or name in ignore:
            continue
        key = ENV_VARS.get(name)
        if key is None:
            raise ConfigError(unknown_env_message(name))
        if environ[name].strip():  # KVTIER_X= (empty) is the shell's way of saying "unset"
            out[key] = (environ[name], f"env {name}")
    return out


def _override_names() -> str:
    """The flat override names for a message: [policy]'s and [remote]'s as policy_<key> and
    remote_<key>, to keep it one line."""
    short = [name for name in OVERRIDE_NAMES if not name.startswith(("remote_", "policy_"))]
    return ", ".join([*short, "policy_name", "policy_<key>", "remote_url", "remote_<key>"])


def read_overrides(overrides: Mapping[str, object]) -> Layers:
    out: Layers = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if name in OVERRIDE_NAMES:
            out[OVERRIDE_NAMES[name]] = (value, "override")
        elif name in TABLES:
            out.update(flatten({name: value}, "override"))
        else:
            hint = did_you_mean(name, [*OVERRIDE_NAMES, *TABLES])
            raise ConfigError(
                f"unknown override {shown(name)}; {hint}use one of {_override_names()} "
                f"or a table such as gpu={{'budget': '2GiB'}}"
            )
    return out
