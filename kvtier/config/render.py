"""A resolved Config written back as TOML (`kvtier config show`): valid, and loading it gives the
same Config. Sizes are written in bytes; each line's comment keeps what was written and where.

Text only: it reads a Config and resolves nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from kvtier.config.keys import DEFAULTS
from kvtier.config.load import Config
from kvtier.sizes import format_size

_BUDGET_KEYS = frozenset({"gpu.budget", "host.budget", "disk.budget"})
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def to_toml(cfg: Config) -> str:
    """`cfg` as a TOML document: one line per key, grouped by table, comments aligned."""
    rows: list[tuple[str, str] | str] = []  # (key = value, comment), or a table header
    table = ""
    for key, value in cfg.resolved().items():
        owner, _, name = key.rpartition(".")
        if owner != table:
            table = owner
            header = ".".join(toml_key(part) for part in owner.split("."))
            rows.append(f"\n[{header}]")
        rows.append((f"{toml_key(name)} = {toml_value(value)}", _note(cfg, key, value)))
    width = max(len(row[0]) for row in rows if isinstance(row, tuple))
    lines = [
        "# kvtier config, resolved: sizes in bytes; each comment says what was written and where.",
        "# Loading this file gives the same config (`kvtier config validate` checks it).",
    ]
    for row in rows:
        lines.append(row if isinstance(row, str) else f"{row[0]:<{width}}  # {row[1]}")
    return "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    """A TOML literal for a bool, int, float, str or Path."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value) if isinstance(value, Path) else value
    assert isinstance(text, str), f"no TOML literal for {type(value).__name__}"
    return '"' + "".join(_escape(char) for char in text) + '"'


def toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else toml_value(name)


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    return f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char


def _note(cfg: Config, key: str, value: object) -> str:
    source = cfg.sources.get(key, "default")
    written = toml_value(cfg.specs[key]) if key in cfg.specs and _literal(cfg.specs[key]) else None
    if key in _BUDGET_KEYS or key.startswith("gpu.devices."):
        size = "no disk tier" if value == 0 else format_size(value)
        note = f"{size}; {written or value} from {source}"
    elif written is not None and written != toml_value(value) and key in DEFAULTS:
        note = f"{written} from {source}"
    else:
        note = f"from {source}"
    return "".join(char if char.isprintable() else "?" for char in note)  # one comment line


def _literal(value: object) -> bool:
    return isinstance(value, bool | int | float | str | Path)
