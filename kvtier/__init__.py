"""kvtier: a tiered KV cache (GPU -> pinned host RAM -> compressed disk) for Hugging Face models.

Importing it stays cheap: the cache, controller and policy modules load on first attribute use.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from kvtier.config import Config, load_config
from kvtier.errors import (
    BudgetError,
    ConfigError,
    KVTierError,
    StoreCorruptError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from kvtier.controller import TierController
    from kvtier.hf.cache import TieredCache, offload
    from kvtier.policy import register_policy

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "Config",
    "ConfigError",
    "KVTierError",
    "StoreCorruptError",
    "TierController",
    "TieredCache",
    "UnsupportedModelError",
    "__version__",
    "load_config",
    "offload",
    "register_policy",
]

# Public name -> the module that defines it, imported on first access.
_LAZY = {
    "TieredCache": "kvtier.hf.cache",
    "offload": "kvtier.hf.cache",
    "TierController": "kvtier.controller",
    "register_policy": "kvtier.policy",
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
