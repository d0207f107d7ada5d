"""`kvtier store ls|du|verify|gc|clear`: look after a disk store (disk.path) or a remote tier."""

from __future__ import annotations

from pathlib import Path

import click

from kvtier.cli.common import echo_table, timestamp
from kvtier.cli.remote import StoreGroup, StoreTarget
from kvtier.errors import KVTierError
from kvtier.sizes import format_size

_STORE_PATH = click.argument("path", type=StoreTarget())


@click.group(name="store", cls=StoreGroup)
def store_group() -> None:
    """List, measure, verify, collect or clear a store processes share: PATH is a disk store's
    directory (disk.path; docs/store.md) or a remote tier's valkey:// URL (docs/remote.md).

    \b
    Examples:
      kvtier store ls ~/.cache/kvtier
      kvtier store du valkey://cache1:6379
      kvtier store verify ~/.cache/kvtier --quarantine
      kvtier store gc ~/.cache/kvtier --max-size 50GiB
      kvtier store clear ~/.cache/kvtier --yes
    """


@store_group.command(name="ls")
@_STORE_PATH
def store_ls(path: Path) -> None:
    """One line per block: id, model (model_key or fingerprint), tokens, bytes, codec ratio,
    last use, and where it lies (shared, and how many processes use it, or one process's).

    Example: kvtier store ls ~/.cache/kvtier
    """
    from kvtier.tiers.disk import catalog

    rows = [("BLOCK", "MODEL", "TOKENS", "BYTES", "RATIO", "LAST USE", "WHERE")]
    for block in catalog.list_blocks(catalog.open_layout(path)):
        ratio = "-" if block.ratio is None else f"{block.ratio:.2f}"
        size, when = format_size(block.file_bytes), timestamp(block.last_use_ns)
        rows.append(
            (block.block_id, block.model, block.tokens_text, size, ratio, when, block.place)
        )
    echo_table(rows)


@store_group.command(name="du")
@_STORE_PATH
def store_du(path: Path) -> None:
    """Totals per model (blocks, tokens, bytes, codec ratio, last use), then the store's.

    Example: kvtier store du ~/.cache/kvtier
    """
    from kvtier.tiers.disk import catalog, ledger

    layout = catalog.open_layout(path)
    found = ledger.survey(layout)
    rows = [("MODEL", "BLOCKS", "TOKENS", "BYTES", "RATIO", "LAST USE")]
    for total in catalog.by_model(catalog.list_blocks(layout, found)):
        ratio = "-" if total.ratio is None else f"{total.ratio:.2f}"
        size, when = format_size(total.file_bytes), timestamp(total.last_use_ns)
        tokens = str(total.tokens or "-")
        rows.append((total.model, str(total.blocks), tokens, size, ratio, when))
    echo_table(rows)
    click.echo(f"store: {format_size(found.used_bytes)} in {layout.tree}")
    click.echo(f"quarantine: {len(list(layout.quarantine.glob('*')))} files")
    dead = catalog.orphans(layout, found)
    if dead:
        click.echo(
            f"orphans: {len(dead)} left by dead processes (the next open or gc removes them)"
        )


@store_group.command(name="verify")
@_STORE_PATH
@click.option("--quarantine", "move_aside", is_flag=True, help="Move bad files to quarantine/.")
@click.pass_context
def store_verify(ctx: click.Context, path: Path, move_aside: bool) -> None:
    """Check every checksum of every block file; exit 1 and name each bad file if any.

    Example: kvtier store verify ~/.cache/kvtier --quarantine
    """
    from kvtier.tiers.disk import catalog

    layout = catalog.open_layout(path)
    checked, bad = catalog.verify(layout, move_aside=move_aside)
    for verdict in bad:
        moved = f" (moved to {verdict.moved_to})" if verdict.moved_to else ""
        click.echo(f"bad: {verdict.path}: {verdict.problem}{moved}")
    click.echo(f"checked {checked} block files: {len(bad)} bad")
    ctx.exit(1 if bad else 0)


@store_group.command(name="gc")
@_STORE_PATH
@click.option("--max-size", default=None, help="Delete least recently used blocks down to this.")
def store_gc(path: Path, max_size: str | None) -> None:
    """Delete what dead processes left; with --max-size also the least recently used shared
    blocks until the store fits (blocks that running processes use stay).

    Example: kvtier store gc ~/.cache/kvtier --max-size 50GiB
    """
    from kvtier.sizes import parse_size
    from kvtier.tiers.disk import catalog

    limit = None if max_size is None else parse_size(max_size, key="--max-size")
    done = catalog.collect(catalog.open_layout(path), max_bytes=limit)
    click.echo(
        f"removed {done.removed_blocks} blocks ({format_size(done.freed_bytes)}), "
        f"{done.swept_areas} areas and {done.swept_temps} temp files of dead processes; "
        f"store now {format_size(done.used_bytes)}"
    )


@store_group.command(name="clear")
@_STORE_PATH
@click.option("--yes", is_flag=True, help="Really delete every block in PATH.")
def store_clear(path: Path, yes: bool) -> None:
    """Delete every block (running processes keep theirs until they close) and the quarantine.

    Example: kvtier store clear ~/.cache/kvtier --yes
    """
    from kvtier.tiers.disk import catalog

    layout = catalog.open_layout(path)
    if not yes:
        raise KVTierError(f"kvtier store clear deletes every block in {layout.root}; add --yes")
    deleted, held = catalog.clear(layout)
    click.echo(f"deleted {deleted} files; {held} blocks held by running processes remain")
