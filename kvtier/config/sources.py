"""Where config values come from: the TOML file, KVTIER_* variables and keyword overrides.

Each source becomes layers (dotted key -> (value as written, source)); nothing is validated here
beyond the names of keys and tables. The messages helpers name the source of a bad value.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
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
from kvtier.errors import ConfigError


def fail(message: str, source: str) -> NoReturn:
    raise ConfigError(with_source(message, source))


def with_source(message: str, source: str) -> str:
    return message if source == "default" else f"{message} (from {source})"


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def read_file(path: str | os.PathLike[str]) -> Layers:
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
    return flatten(data, f"file {file}")


def flatten(data: Mapping[str, object], source: str) -> Layers:
    tables = ", ".join(f"[{name}]" for name in TABLES)
    out: Layers = {}
    for name, value in data.items():
        if name in TOP_LEVEL_KEYS:
            out[name] = (value, source)
        elif name in TABLES:
            keys = ", ".join(TABLES[name])
            if not isinstance(value, Mapping):
                fail(f"{name} = {value!r} is not a table; write [{name}] with keys {keys}", source)
            for sub, sub_value in value.items():
                if sub not in TABLES[name]:
                    hint = did_you_mean(sub, list(TABLES[name]))
                    fail(f"unknown key '{name}.{sub}'; {hint}[{name}] takes: {keys}", source)
                if sub_value is not None:
                    out[f"{name}.{sub}"] = (sub_value, source)
        else:
            kind = "table" if isinstance(value, Mapping) else "key"
            hint = did_you_mean(name, [*TOP_LEVEL_KEYS, *TABLES])
            allowed = f"keys are {', '.join(TOP_LEVEL_KEYS)} and the tables {tables}"
            fail(f"unknown {kind} {name!r}; {hint}{allowed}", source)
    return out


def read_env(environ: Mapping[str, str]) -> Layers:
    out: Layers = {}
    for name in sorted(environ):
        if not name.startswith("KVTIER_") or name in ENV_NOT_CONFIG:
            continue
        key = ENV_VARS.get(name)
        if key is None:
            hint = did_you_mean(name, list(ENV_VARS))
            raise ConfigError(
                f"unknown environment variable {name}; {hint}kvtier reads "
                f"{', '.join(ENV_VARS)} and KVTIER_LOG_LEVEL; unset it or fix its name"
            )
        if environ[name].strip():  # KVTIER_X= (empty) is the shell's way of saying "unset"
            out[key] = (environ[name], f"env {name}")
    return out


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
                f"unknown override {name!r}; {hint}use one of {', '.join(OVERRIDE_NAMES)} "
                f"or a table such as gpu={{'budget': '2GiB'}}"
            )
    return out
