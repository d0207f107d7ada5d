"""`kvtier store ls|du|verify|gc|clear` given a remote tier's valkey:// URL instead of a directory.

Part of the command line (it prints): cli/store.py's group is a StoreGroup, which gives each
command the options a URL takes and runs the remote variant here when PATH is a URL. The work
is kvtier.tiers.remote.admin's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from kvtier.errors import KVTierError
from kvtier.sizes import format_size

SCHEMES = ("valkey://", "valkeys://")
_FILES = ("password_file", "ca_file", "cert_file", "key_file", "hmac_key_file")


class StoreTarget(click.ParamType):
    """A store's directory (as click.Path(file_okay=False) checks it) or a valkey:// URL."""

    name = "PATH|URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.lower().startswith(SCHEMES):
            return value
        return click.Path(file_okay=False, path_type=Path).convert(value, param, ctx)


def _options(command: str) -> list[click.Option]:
    file_help = "With a URL: as [remote] {} (docs/remote.md)."
    options = [
        click.Option([f"--{name.replace('_', '-')}"], default=None, help=file_help.format(name))
        for name in _FILES
    ]
    options += [
        click.Option(["--cluster"], is_flag=True, help="With a URL of one node: it is a cluster."),
        click.Option(["--timeout-ms"], type=int, default=None, help="With a URL: per call."),
    ]
    if command == "verify":
        options.append(
            click.Option(["--delete"], is_flag=True, help="With a URL: delete bad ones.")
        )
    return options


class StoreGroup(click.Group):
    """The `store` group: every command added also takes a URL, run by this module's runner."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        command = name or cmd.name
        if command in RUNNERS and cmd.callback is not None:
            extra = _options(command)
            cmd.params.extend(extra)
            cmd.callback = _dispatch(command, cmd.callback, [o.name for o in extra])
        super().add_command(cmd, name)


def _dispatch(command: str, disk: Callable[..., Any], names: list[str | None]) -> Callable:
    @functools.wraps(disk)
    def callback(**kwargs: Any) -> Any:
        options = {name: kwargs.pop(name) for name in names if name}
        if isinstance(kwargs["path"], str):
            return RUNNERS[command](kwargs["path"], options, kwargs)
        given = [name for name, value in options.items() if value not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise KVTierError(f"{flag} goes with a valkey:// URL, not a store directory")
        return disk(**kwargs)

    return callback


def _client(url: str, options: Mapping[str, Any]):  # noqa: ANN202 - a RemoteClient
    from kvtier.tiers.remote import admin
    from kvtier.tiers.remote.url import parse_remote

    table: dict[str, object] = {"url": url}
    table |= {name: options[name] for name in _FILES if options.get(name)}
    if options.get("cluster"):
        table["cluster"] = True
    if options.get("timeout_ms") is not None:
        table["timeout_ms"] = options["timeout_ms"]
    spec = parse_remote(table)
    return spec, admin.connect(spec)


def _ls(url: str, options: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    from kvtier.tiers.remote import admin

    spec, client = _client(url, options)
    with client:
        blocks = admin.list_blocks(client, hmac_key=spec.hmac_key)
    rows = [("BLOCK", "MODEL", "TOKENS", "BYTES", "IDLE", "SIGNED", "PROBLEM")]
    for b in blocks:
        tokens = "-" if b.tokens is None else str(b.tokens)
        signed = "yes" if b.signed else "no"
        idle = _idle(b.idle_s)
        rows.append(
            (b.block_id, b.model, tokens, format_size(b.value_bytes), idle, signed, b.problem or "")
        )
    _table(rows)


def _du(url: str, options: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    from kvtier.tiers.remote import admin

    spec, client = _client(url, options)
    with client:
        blocks = admin.list_blocks(client, hmac_key=spec.hmac_key)
        used = admin.used_memory_bytes(client)
    rows = [("MODEL", "BLOCKS", "TOKENS", "BYTES", "LAST USE")]
    for t in admin.by_model(blocks):
        rows.append(
            (
                t.model,
                str(t.blocks),
                str(t.tokens or "-"),
                format_size(t.value_bytes),
                _idle(t.least_idle_s),
            )
        )
    _table(rows)
    total = sum(b.value_bytes for b in blocks)
    click.echo(f"kvtier values: {format_size(total)} in {len(blocks)} blocks")
    click.echo(f"server memory: {format_size(used)} in use (every key, and the server's own)")


def _verify(url: str, options: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    from kvtier.tiers.remote import admin

    if kwargs.get("move_aside"):
        raise KVTierError("a server has no quarantine; pass --delete to delete bad values")
    spec, client = _client(url, options)
    with client:
        checked, bad = admin.verify(client, hmac_key=spec.hmac_key, delete=options["delete"])
    for block in bad:
        click.echo(f"bad: {block.key}: {block.problem}{' (deleted)' if options['delete'] else ''}")
    click.echo(f"checked {checked} values: {len(bad)} bad")
    click.get_current_context().exit(1 if bad else 0)


def _gc(url: str, options: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    from kvtier.sizes import parse_size
    from kvtier.tiers.remote import admin

    max_size = kwargs.get("max_size")
    limit = None if max_size is None else parse_size(max_size, key="--max-size")
    _, client = _client(url, options)
    with client:
        done = admin.collect(client, max_bytes=limit)
    click.echo(
        f"removed {done.removed_blocks} blocks ({format_size(done.freed_bytes)}), least recently "
        f"used first; kvtier values now {format_size(done.used_bytes)}"
    )


def _clear(url: str, options: Mapping[str, Any], kwargs: Mapping[str, Any]) -> None:
    from kvtier.tiers.remote import admin

    if not kwargs.get("yes"):
        raise KVTierError(f"kvtier store clear deletes every kvtier value on {url}; add --yes")
    _, client = _client(url, options)
    with client:
        deleted = admin.clear(client)
    click.echo(f"deleted {deleted} values; keys of other programs stay")


RUNNERS: dict[str, Callable[[str, Mapping[str, Any], Mapping[str, Any]], None]] = {
    "ls": _ls,
    "du": _du,
    "verify": _verify,
    "gc": _gc,
    "clear": _clear,
}


def _idle(seconds: int | None) -> str:
    return "-" if seconds is None else f"{timedelta(seconds=seconds)} ago"


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
