"""The config's keys: each dotted key's default, the tables, and the env / override names.

The defaults live in one place, the documented kvtier/data/default.toml shipped in the package
(configs/default.toml links to it); this module reads it once. Names only: no validation.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from types import MappingProxyType


def default_toml() -> str:
    """The documented default config, every key with its default (`kvtier config init` writes it)."""
    return resources.files("kvtier.data").joinpath("default.toml").read_text(encoding="utf-8")


def _dotted(document: Mapping[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in document.items():
        if isinstance(value, Mapping):
            out.update({f"{name}.{key}": default for key, default in value.items()})
        else:
            out[name] = value
    return out


# Dotted key -> default, in the file's order. The one source of truth for the keys and defaults.
DEFAULTS: Mapping[str, object] = MappingProxyType(_dotted(tomllib.loads(default_toml())))
TABLES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        table: tuple(key.split(".")[1] for key in DEFAULTS if key.startswith(table + "."))
        for table in dict.fromkeys(key.split(".")[0] for key in DEFAULTS if "." in key)
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

# Dotted key -> (value as written, source): "default", "file <path>", "env KVTIER_X", "override".
Layers = dict[str, tuple[object, str]]
