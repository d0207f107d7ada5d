"""One config value at a time: layers -> a checked int, bool, codec, path, policy name or budget.

Budgets written as bytes, "2GiB", "40%" or "auto" become ints here (parsing in sizes.py, free
memory passed in by the caller); a bad value raises ConfigError naming its key and source.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from kvtier.config.keys import AUTO_BUDGETS, CODECS, Layers
from kvtier.config.sources import fail, with_source
from kvtier.errors import ConfigError
from kvtier.registry import registered_policies
from kvtier.sizes import parse_percent, parse_size

log = logging.getLogger("kvtier.config")  # the package's logger: one name for users to filter

_BUDGET_HINT = "use bytes, '2GiB', '40%' or 'auto'"
_ENV_TRUE = frozenset({"true", "1", "yes"})
_ENV_FALSE = frozenset({"false", "0", "no"})


def as_int(
    layers: Layers,
    key: str,
    allowed: str,
    minimum: int,
    multiple: int = 1,
    maximum: int | None = None,
) -> int:
    value, source = layers[key]
    number = value
    if source.startswith("env ") and isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, int):
        fail(f"{key} = {value!r} is not {allowed}", source)
    if number < minimum or number % multiple or (maximum is not None and number > maximum):
        fail(f"{key} = {value!r} is not {allowed}", source)
    return number


def as_bool(layers: Layers, key: str) -> bool:
    value, source = layers[key]
    if isinstance(value, bool):
        return value
    if source.startswith("env ") and isinstance(value, str):
        word = value.strip().lower()
        if word in _ENV_TRUE | _ENV_FALSE:
            return word in _ENV_TRUE
        fail(f"{key} = {value!r} is not a boolean; use true/false, 1/0 or yes/no", source)
    fail(f"{key} = {value!r} is not a boolean; use true or false", source)


def as_codec(layers: Layers) -> str:
    value, source = layers["disk.codec"]
    if value not in CODECS:
        fail(f"disk.codec = {value!r} is not a codec; use one of {', '.join(CODECS)}", source)
    return str(value)


def as_policy_name(layers: Layers) -> str:
    value, source = layers["policy.name"]
    names = registered_policies()
    if value not in names:
        fail(
            f"policy.name = {value!r} is not a registered policy; registered: "
            f"{', '.join(sorted(names))}; register yours with kvtier.register_policy(name) "
            "before load_config",
            source,
        )
    return str(value)


def as_path(layers: Layers, key: str) -> Path:
    value, source = layers[key]
    if not isinstance(value, str | os.PathLike) or not str(os.fspath(value)).strip():
        fail(f"{key} = {value!r} is not a path; use a directory such as '~/.cache/kvtier'", source)
    path = Path(value).expanduser()
    if not path.is_absolute():
        base = Path(source.removeprefix("file ")).parent if source.startswith("file ") else None
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


def as_budget(layers: Layers, key: str, free: Callable[[], int]) -> int:
    value, source = layers[key]
    tier = key.split(".")[0]
    spec = value
    if isinstance(value, str) and value.strip().lower() == "auto":
        spec = AUTO_BUDGETS[tier]
    if isinstance(spec, str) and spec.strip().endswith("%"):
        percent = _sized(parse_percent, spec, key=key, hint=_BUDGET_HINT, source=source)
        if not 0 < percent <= 100:
            off = " (disk.budget = 0 turns the disk tier off)" if tier == "disk" else ""
            fail(f"{key} = {value!r} is not a percentage above 0% and at most 100%{off}", source)
        available = free()
        budget = int(Decimal(available) * percent / 100)
        how = f" ({percent}% of {available} bytes free)"
    else:
        budget = _sized(parse_size, value, key=key, hint=_BUDGET_HINT, source=source)
        how = ""
    if budget == 0 and tier != "disk":
        fail(
            f"{key} = {value!r} resolves to 0 bytes{how}; the {tier} tier needs room: use a size "
            "like '2GiB', a percentage like '40%' or 'auto' (only disk.budget may be 0)",
            source,
        )
    if budget == 0 and how:
        log.warning(
            "disk.budget = %r resolved to 0 bytes%s; running without a disk tier", value, how
        )
    log.debug("%s = %r resolved to %d bytes%s", key, value, budget, how)
    return budget


def _sized(parse: Callable[..., object], value: object, *, key: str, hint: str, source: str):
    """`parse(value, key=, hint=)` with the value's source added to a ConfigError."""
    try:
        return parse(value, key=key, hint=hint)
    except ConfigError as error:
        raise ConfigError(with_source(str(error), source)) from None
