"""kvtier: a tiered KV cache (GPU -> pinned host RAM -> compressed disk) for Hugging Face models.

The user's surface only. Importing it stays cheap: the cache and policy modules load on first
attribute use.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from kvtier._version import __version__
from kvtier.config import Config, load_config
from kvtier.errors import (
    BudgetError,
    ConfigError,
    KVTierError,
    StoreCorruptError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from kvtier.hf.cache import TieredCache
    from kvtier.hf.offload import offload
    from kvtier.policy import Policy
    from kvtier.registry import register_policy
    from kvtier.tiers.host import release_pinned_memory


__all__ = [
    "BudgetError",
    "Config",
    "ConfigError",
    "KVTierError",
    "Policy",
    "StoreCorruptError",
    "TieredCache",
    "UnsupportedModelError",
    "__version__",
    "load_config",
    "offload",
    "register_policy",
    "release_pinned_memory",
]

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "TieredCache": "kvtier.hf.cache",
    "offload": "kvtier.hf.offload",
    "Policy": "kvtier.policy",
    "register_policy": "kvtier.registry",
    "release_pinned_memory": "kvtier.tiers.host",
}

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
