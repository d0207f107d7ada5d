"""The [policy] table's user parts: the module to import first, the name, the policy's settings.

The module (`[policy] module`) is imported through the registry before the name is looked up,
so a user's `register_policy` runs in every process that loads the config; `[policy.<name>]`
tables are checked against the settings each policy declares (`Policy.settings`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from kvtier.config.keys import TABLES, Layers
from kvtier.config.sources import did_you_mean, fail, quoted, with_source
from kvtier.config.values import as_path
from kvtier.errors import ConfigError, printable, shown
from kvtier.registry import import_policy_module, policy_settings, registered_policies
from kvtier.sizes import MAX_BYTES

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def as_policy_module(layers: Layers) -> str:
    """Import `policy.module` (once per process) and return it as PolicyConfig keeps it: a dotted
    name, a .py file's absolute path, or "" for none."""
    value, source = layers["policy.module"]
    example = "use a dotted name such as 'my_pkg.my_policy', the path of a .py file, or ''"
    if not isinstance(value, str):
        fail(f"policy.module = {shown(value)} is not a module; {example}", source)
    spec = value.strip()
    if not spec:
        return ""
    if spec.endswith(".py"):  # a file: relative to the config file that names it, like disk.path
        spec = str(as_path({"policy.module": (spec, source)}, "policy.module", example))
    elif not all(part.isidentifier() for part in spec.split(".")):
        fail(f"policy.module = {shown(value)} is not a module name; {example}", source)
    try:
        import_policy_module(spec)
    except ConfigError as error:  # keep the user's traceback (the cause) for Python callers
        raise ConfigError(with_source(str(error), source)) from error.__cause__
    return spec


def as_policy_name(layers: Layers, module: str) -> str:
    value, source = layers["policy.name"]
    names = registered_policies()
    if not isinstance(value, str) or value not in names:
        imported = f" (after importing policy.module = {module!r})" if module else ""
        fail(
            f"policy.name = {shown(value)} is not a registered policy{imported}; registered: "
            f"{', '.join(names)}; register yours with kvtier.register_policy(name) before "
            "load_config, or in the module that policy.module names",
            source,
        )
    return value


def as_policy_settings(layers: Layers, name: str) -> Mapping[str, object]:
    """Policy `name`'s settings: its declared defaults with its [policy.<name>] table on top.

    Every [policy.<other>] table is checked too (a file may hold several policies' settings and
    pick one by policy.name or KVTIER_POLICY_NAME); a table of an unregistered name is an error.
    """
    tables: dict[str, dict[str, tuple[object, str]]] = {}
    for key, layer in layers.items():
        parts = key.split(".", 2)
        if len(parts) == 3 and parts[0] == "policy":
            tables.setdefault(parts[1], {})[parts[2]] = layer
    registered = registered_policies()
    chosen: dict[str, object] = {}
    for policy, table in tables.items():
        source = next(iter(table.values()))[1]
        if policy not in registered:
            hint = did_you_mean(policy, registered)
            fail(
                f"unknown key {quoted('policy.' + policy)}; {hint}a [policy.<name>] table holds "
                f"the settings of a registered policy: {', '.join(registered)}",
                source,
            )
        declared = _declared(policy, source)
        values = {key: _setting(policy, key, *layer, declared) for key, layer in table.items()}
        if policy == name:
            chosen = values
    return MappingProxyType({**_declared(name, layers["policy.name"][1]), **chosen})


def _declared(policy: str, source: str) -> Mapping[str, object]:
    try:
        return policy_settings(policy)
    except ConfigError as error:
        raise ConfigError(with_source(str(error), source)) from None


def _setting(
    policy: str, setting: str, value: object, source: str, declared: Mapping[str, object]
) -> object:
    key = f"policy.{policy}.{setting}"
    if setting not in declared:
        takes = f"takes: {', '.join(declared)}" if declared else "declares no settings"
        hint = did_you_mean(setting, list(declared))
        moved = (
            f" ({setting} is a [policy] key: write it there)" if setting in TABLES["policy"] else ""
        )
        fail(f"unknown key {quoted(key)}; {hint}policy {policy!r} {takes}{moved}", source)
    default = declared[setting]
    kind = type(default)
    written = value
    if kind is float and type(value) is int:
        value = float(value) if abs(value) <= MAX_BYTES else math.inf
    fits = type(value) is kind
    if fits and kind is int:
        fits = abs(value) <= MAX_BYTES
    if fits and kind is float:
        fits = math.isfinite(value)
    if not fits:
        fail(
            f"{printable(key)} = {shown(written)} is not {_KINDS[kind]} (default {default!r})",
            source,
        )
    return value
