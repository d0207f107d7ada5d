"""`kvtier info`: versions, GPUs, host RAM, and the budgets and disk space kvtier would use."""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

import click

from kvtier._version import __version__
from kvtier.cli.app import one_line
from kvtier.config import DEFAULTS, resolve, unknown_env_message, unknown_env_vars
from kvtier.errors import KVTierError
from kvtier.machine import gpu_lines, nearest_existing
from kvtier.sizes import format_size


@click.command()
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
        click.echo(f"config: error: {one_line(exc)}")
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
