"""`kvtier config init|show|validate`: write, show or check a configuration."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kvtier.config import default_toml, load_config, to_toml
from kvtier.errors import ConfigError


@click.group(name="config")
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
