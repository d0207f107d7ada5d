"""Pieces several commands share: tables, timestamps, and the --config / --set options.

Parsing and layout of what the commands print; no command lives here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click

from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.config import Config


def timestamp(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds")


def table_lines(rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> list[str]:
    """Rows as aligned text columns (two spaces apart); columns in `right` are right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def echo_table(rows: Sequence[Sequence[str]], *, err: bool = False) -> None:
    for line in table_lines(rows):
        click.echo(line, err=err)


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--config FILE and --set KEY=VALUE (repeatable): the config a command runs with."""
    command = click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Set any config key on top of FILE and KVTIER_* (repeatable), e.g. "
        "--set gpu.budget=2GiB --set disk.path=/nvme/kv --set block_tokens=64.",
    )(command)
    return click.option(
        "--config",
        "config_path",
        default=None,
        metavar="FILE",
        help="TOML config (see `kvtier config init`); KVTIER_* and --set go on top.",
    )(command)


def parse_sets(sets: Sequence[str]) -> dict[str, object]:
    """`--set KEY=VALUE` pairs as load_config overrides (tables nested by the dots).

    A VALUE that reads as a TOML value (64, true, "x") is that value; anything else is a string,
    so `--set gpu.budget=2GiB` needs no quotes. Later pairs win.
    """
    overrides: dict[str, object] = {}
    for item in sets:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE; e.g. --set gpu.budget=2GiB")
        _check_key(item, key)
        parts = key.split(".")
        into = overrides
        for part in parts[:-1]:
            existing = into.setdefault(part, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a key, not a table")
            into = existing
        into[parts[-1]] = _value(text.strip())
    return overrides


def _check_key(item: str, key: str) -> None:
    from kvtier.config import DEFAULTS
    from kvtier.config.sources import did_you_mean

    parts = key.split(".")
    policy_setting = len(parts) == 3 and parts[0] == "policy" and all(parts)
    device_budget = len(parts) == 3 and parts[:2] == ["gpu", "devices"] and all(parts)
    if key not in DEFAULTS and not policy_setting and not device_budget:
        hint = did_you_mean(key, list(DEFAULTS))
        raise ConfigError(
            f"--set {item!r}: unknown config key {key!r}; {hint}keys are {', '.join(DEFAULTS)} "
            "(or policy.<name>.<setting>, gpu.devices.<device>)"
        )


def _value(text: str) -> object:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def load_cli_config(config_path: str | None, sets: Sequence[str], **forced: object) -> Config:
    """The config from FILE, KVTIER_*, then --set, then `forced` keyword overrides (a command's
    own choices, e.g. the budgets `kvtier verify` imposes)."""
    from kvtier.config import load_config

    return load_config(config_path, **{**parse_sets(sets), **forced})
