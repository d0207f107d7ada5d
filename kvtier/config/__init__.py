"""Configuration: defaults -> TOML file -> KVTIER_* environment -> keyword overrides, later wins.

keys.py names the keys, sources.py reads each source into layers, values.py and policies.py
check the values, load.py holds the schema and `load_config`, render.py writes a Config back as
TOML. Budgets become bytes here, once.
"""

from __future__ import annotations

from kvtier.config.keys import (
    AUTO_BUDGETS,
    CODECS,
    DEFAULTS,
    ENV_NOT_CONFIG,
    ENV_VARS,
    MAX_PREFETCH_DEPTH,
    OVERRIDE_NAMES,
    TABLES,
    TOP_LEVEL_KEYS,
    default_toml,
)
from kvtier.config.load import (
    Config,
    DiskConfig,
    GpuConfig,
    HostConfig,
    PolicyConfig,
    load_config,
    resolve,
)
from kvtier.config.remote import RemoteConfig
from kvtier.config.render import to_toml
from kvtier.config.sources import unknown_env_message, unknown_env_vars

__all__ = [
    "AUTO_BUDGETS",
    "CODECS",
    "DEFAULTS",
    "ENV_NOT_CONFIG",
    "ENV_VARS",
    "MAX_PREFETCH_DEPTH",
    "OVERRIDE_NAMES",
    "TABLES",
    "TOP_LEVEL_KEYS",
    "Config",
    "DiskConfig",
    "GpuConfig",
    "HostConfig",
    "PolicyConfig",
    "RemoteConfig",
    "default_toml",
    "load_config",
    "resolve",
    "to_toml",
    "unknown_env_message",
    "unknown_env_vars",
]
