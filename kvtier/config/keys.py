"""The config's keys: each dotted key's default, the tables, and the env / override names.

Names only: no reading, no validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

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

# Dotted key -> (value as written, source): "default", "file <path>", "env KVTIER_X", "override".
Layers = dict[str, tuple[object, str]]
