"""The policy registry: policy name -> factory. The bottom floor that config and policy both import.

Built-in policies are named here and imported on first use, so this module imports nothing of
kvtier above it; `kvtier.register_policy` adds user policies, `import_policy_module` runs the
module that registers them ([policy] module). The one piece of global state.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kvtier.errors import ConfigError, printable, shown

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
    Register before `kvtier.load_config` looks the name up: in code that runs first, or in the
    module that `[policy] module` names (load_config imports it).
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"policy name {shown(name)} must be a non-empty string")
    if "." in name:  # [policy.<name>] holds its settings: a dot would split the name
        raise ConfigError(f"policy name {shown(name)} must not contain '.'; use '_' or '-'")

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


SETTING_TYPES = (bool, int, float, str)


def policy_settings(name: str) -> Mapping[str, object]:
    """The settings policy `name` declares (setting -> default; its `settings` class attribute),
    checked to be a mapping of str to an int, float, bool or str default."""
    declared = getattr(policy_factory(name), "settings", None) or {}
    if not isinstance(declared, Mapping) or not all(
        isinstance(key, str) and type(default) in SETTING_TYPES for key, default in declared.items()
    ):
        raise ConfigError(
            f"policy {name!r} declares settings = {shown(declared)}; declare a dict of setting "
            "name -> default, each default an int, float, bool or str"
        )
    return MappingProxyType(dict(declared))


def import_policy_module(spec: str) -> None:
    """Import `spec` once per process so its `register_policy` calls run: a dotted module name,
    or the absolute path of a .py file (imported under its stem, which must not name another
    module). ConfigError, one line, if it cannot be imported or raises while importing."""
    try:
        if spec.endswith(".py"):
            _import_file(Path(spec))
        else:
            importlib.import_module(spec)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name is None or not (spec == exc.name or spec.startswith(exc.name + ".")):
            raise _import_failed(spec, exc) from exc  # a module the user's module imports
        raise ConfigError(
            f"policy.module = {shown(spec)} cannot be imported: no module named {exc.name!r}; "
            "install it, put its directory on PYTHONPATH, or give the path of its .py file"
        ) from None
    except Exception as exc:  # the user's module raised: its traceback stays in __cause__
        raise _import_failed(spec, exc) from exc


def _import_failed(spec: str, exc: Exception) -> ConfigError:
    reason = " ".join(str(exc).split())[:160]
    return ConfigError(
        f"policy.module = {shown(spec)} failed to import: {type(exc).__name__}: {reason}; "
        "fix the module (python -c 'import ...' shows the traceback)"
    )


def _import_file(path: Path) -> None:
    name = path.stem
    if not name.isidentifier():
        raise ConfigError(
            f"policy.module = '{printable(path)}': {name!r} is not a module name; rename the "
            "file to letters, digits and _"
        )
    if not path.is_file():
        raise ConfigError(f"policy.module = '{printable(path)}' is not a file; fix the path")
    found = importlib.util.find_spec(name)
    if found is not None and found.origin and Path(found.origin).resolve() != path.resolve():
        raise ConfigError(
            f"policy.module = '{printable(path)}': another module named {name!r} exists "
            f"({printable(found.origin)}); rename the file"
        )
    if name in sys.modules:  # this very file, imported before
        return
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
