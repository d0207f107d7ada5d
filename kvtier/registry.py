"""The policy registry: policy name -> factory. The bottom floor that config and policy both import.

Built-in policies are named here and imported on first use, so this module imports nothing of
kvtier above it; `kvtier.register_policy` adds user policies. The one piece of global state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from kvtier.errors import ConfigError

# the factory is called as factory(policy_config, block_tokens) and returns a kvtier.Policy
PolicyFactory = Callable[[Any, int], Any]

BUILTIN: dict[str, str] = {
    "lru": "kvtier.policy.base:Policy",  # the base policy is least recently used
    "lfu": "kvtier.policy.lfu:LFUPolicy",
    "sink_recent": "kvtier.policy.sink_recent:SinkRecentPolicy",
}
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy selectable as `[policy] name = "<name>"`.

    The class is called as `cls(policy_config, block_tokens)` and should subclass `kvtier.Policy`.
    Register before `kvtier.load_config` so the config validates the name.
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"policy name {name!r} must be a non-empty string")

    def decorate(factory: PolicyFactory) -> PolicyFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def registered_policies() -> list[str]:
    """Every name `policy.name` accepts: the built-ins and those registered since."""
    return sorted(set(BUILTIN) | set(_REGISTRY))


def policy_factory(name: str) -> PolicyFactory:
    """The factory registered as `name` (a user registration shadows a built-in)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BUILTIN:
        module, _, attribute = BUILTIN[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
    raise ConfigError(
        f"policy.name = {name!r} is not a registered policy; use one of "
        f"{', '.join(registered_policies())} or register yours with "
        "kvtier.register_policy(name) before load_config"
    )
