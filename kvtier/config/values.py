"""One config value at a time: layers -> a checked int, bool, codec, path or budget.

Budgets written as bytes, "2GiB", "40%" or "auto" become ints here (parsing in sizes.py, free
memory passed in by the caller); a bad value raises ConfigError naming its key and source.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from kvtier.config.keys import AUTO_BUDGETS, CODECS, Layers
from kvtier.config.sources import fail, with_source
from kvtier.errors import ConfigError, printable, shown
from kvtier.machine import free_disk_bytes, store_problem
from kvtier.sizes import format_size, parse_percent, parse_size

log = logging.getLogger("kvtier.config")  # the package's logger: one name for users to filter

_BUDGET_HINT = "use bytes, '2GiB', '40%' or 'auto'"
_ENV_TRUE = frozenset({"true", "1", "yes"})
_ENV_FALSE = frozenset({"false", "0", "no"})
_ENV_INT = re.compile(r"-?[0-9]+", re.ASCII)  # not int(): it reads "1_6" and "１６" as 16
MAX_TOKENS = 2**31  # a bound on every token count: past any context, and printable


def as_int(
    layers: Layers,
    key: str,
    allowed: str,
    minimum: int,
    multiple: int = 1,
    maximum: int = MAX_TOKENS,
) -> int:
    value, source = layers[key]
    number = value
    if source.startswith("env ") and isinstance(value, str):
        word = value.strip()
        if _ENV_INT.fullmatch(word):
            number = int(word) if len(word) <= 20 else maximum + 1  # int() refuses 4300 digits
        else:
            number = None
    if isinstance(number, bool) or not isinstance(number, int):
        fail(f"{key} = {shown(value)} is not {allowed}", source)
    if number > maximum and maximum == MAX_TOKENS:
        fail(f"{key} = {shown(value)} is more than {MAX_TOKENS} tokens; use {allowed}", source)
    if number > maximum:
        fail(f"{key} = {shown(value)} is not {allowed}", source)
    if number < minimum or number % multiple:
        fail(f"{key} = {shown(value)} is not {allowed}", source)
    return number


def as_bool(layers: Layers, key: str) -> bool:
    value, source = layers[key]
    if isinstance(value, bool):
        return value
    if source.startswith("env ") and isinstance(value, str):
        word = value.strip().lower()
        if word in _ENV_TRUE | _ENV_FALSE:
            return word in _ENV_TRUE
        fail(f"{key} = {shown(value)} is not a boolean; use true/false, 1/0 or yes/no", source)
    fail(f"{key} = {shown(value)} is not a boolean; use true or false", source)


def as_codec(layers: Layers) -> str:
    value, source = layers["disk.codec"]
    if not isinstance(value, str) or value not in CODECS:
        fail(f"disk.codec = {shown(value)} is not a codec; use one of {', '.join(CODECS)}", source)
    return value


def as_model_key(layers: Layers) -> str:
    value, source = layers["disk.model_key"]
    if not isinstance(value, str) or value != value.strip() or "\x00" in value:
        fail(
            f"disk.model_key = {shown(value)} is not a model name; use e.g. 'org/model@rev' "
            "or '' to compute one from the weights",
            source,
        )
    return value


def as_path(
    layers: Layers, key: str, example: str = "use a directory such as '~/.cache/kvtier'"
) -> Path:
    """An absolute, normalized path; relative to the config file that wrote it, else the cwd."""
    value, source = layers[key]
    name = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(name, str) or not name.strip():
        fail(f"{key} = {shown(value)} is not a path; {example}", source)
    if "\0" in name:
        fail(f"{key} = {shown(value)} contains a NUL byte; remove it", source)
    try:
        name.encode("utf-8")
        path = Path(name).expanduser()
    except UnicodeEncodeError:  # lone surrogates: bytes that were never UTF-8 text
        fail(f"{key} = {shown(value)} is not valid UTF-8 text; {example}", source)
    except RuntimeError:  # "~nosuchuser/kv": no such user, or no home directory
        user = name[1:].split("/")[0]
        missing = f"there is no user {user!r}" if user else "there is no home directory (HOME)"
        fail(f"{key} = {shown(value)}: {missing} to expand ~{user}; write the full path", source)
    if not path.is_absolute():
        base = Path(source.removeprefix("file ")).parent if source.startswith("file ") else None
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


def check_store(layers: Layers, path: Path) -> None:
    """ConfigError unless a block store can live at `path`: a directory, or one that can be made."""
    source = layers["disk.path"][1]
    off = "use a writable local directory, or disk.budget = 0 for no disk tier"
    try:
        is_file = path.exists() and not path.is_dir()
    except OSError as exc:  # a name too long, a parent without search permission
        is_file, reason = False, f"{exc.strerror or exc}"
    else:
        reason = None if is_file else store_problem(path)
    if is_file:
        fail(f"disk.path = '{printable(path)}' is a file; use a directory", source)
    if reason:
        fail(
            f"disk.path = '{printable(path)}' cannot hold the block store: {reason}; {off}", source
        )


def disk_free(layers: Layers, path: Path) -> int:
    """Free bytes at `path` (its nearest existing ancestor); ConfigError if it cannot be measured."""
    try:
        return free_disk_bytes(path)
    except OSError as exc:
        reason = exc.strerror or exc
        fail(
            f"disk.path = '{printable(path)}' cannot be measured ({reason}); use a readable directory",
            layers["disk.path"][1],
        )


def parse_budget(layers: Layers, key: str) -> int | Decimal:
    """A budget as written: bytes (int), or a percentage (Decimal) of what is free; "auto" is
    the tier's percentage."""
    value, source = layers[key]
    tier = key.split(".")[0]
    spec = value
    if isinstance(value, str) and value.strip().lower() == "auto":
        spec = AUTO_BUDGETS[tier]
    if isinstance(spec, str) and spec.strip().endswith("%"):
        percent = _sized(parse_percent, spec, key=key, hint=_BUDGET_HINT, source=source)
        if not 0 < percent <= 100:
            off = " (disk.budget = 0 turns the disk tier off)" if tier == "disk" else ""
            fail(
                f"{key} = {shown(value)} is not a percentage above 0% and at most 100%{off}",
                source,
            )
        return percent
    return _sized(parse_size, value, key=key, hint=_BUDGET_HINT, source=source)


def as_budget(layers: Layers, key: str, free: Callable[[], int], what: str) -> int:
    """Bytes of the budget at `key`; a percentage is of `free()` ("available RAM", `what`), and
    a size must fit in it: a budget above what the machine has free cannot be met."""
    value, source = layers[key]
    tier = key.split(".")[0]
    spec = parse_budget(layers, key)
    how = ""
    if isinstance(spec, Decimal):
        available = free()
        budget = int(Decimal(available) * spec / 100)
        how = f" ({spec}% of {available} bytes free)"
    elif spec > 0 and spec > (available := free()):
        fail(
            f"{key} = {shown(value)} is {format_size(spec)}, more than the "
            f"{format_size(available)} of {what}; lower it, or use a percentage of what is free "
            f"such as {AUTO_BUDGETS[tier]!r}",
            source,
        )
    else:
        budget = spec
    if budget == 0 and tier != "disk":
        fail(
            f"{key} = {shown(value)} resolves to 0 bytes{how}; the {tier} tier needs room: use a "
            "size like '2GiB', a percentage like '40%' or 'auto' (only disk.budget may be 0)",
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


def as_admit_after_hits(layers: Layers) -> int:
    """disk.admit_after_hits, which only means something with disk.persist or remote.persist."""
    hits = as_int(layers, "disk.admit_after_hits", "an integer >= 0 (e.g. 2)", 0)
    if hits and not (as_bool(layers, "disk.persist") or as_bool(layers, "remote.persist")):
        fail(
            f"disk.admit_after_hits = {hits} is set but neither disk.persist nor remote.persist "
            "is true; set one of them to true, or drop disk.admit_after_hits",
            layers["disk.admit_after_hits"][1],
        )
    return hits
