"""Pieces several commands share: tables and timestamps.

Parsing and layout of what the commands print; no command lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import click


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
