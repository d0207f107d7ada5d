"""Sizes as people write them ("2GiB", "512MB", "40%") and back ("3.20 GiB").

Pure parsing and formatting: no machine probes, no config keys beyond the one named in an error.
Numbers are ASCII digits only: "１６GiB" (full-width) or "1_6" is not a size.
"""

from __future__ import annotations

import re
from decimal import Decimal

from kvtier.errors import ConfigError, shown

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
UNIT_NAMES = "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
SIZE_HINT = "use bytes or a size like '2GiB' or '512MB'"
MAX_BYTES = 2**63 - 1  # 8 EiB: past any machine, and what OS byte counts (off_t) can hold
_NUMBER = r"(-?)\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"  # re.ASCII: \s and the digits are ASCII only
_SIZE_RE = re.compile(_NUMBER + r"\s*([a-z]*)", re.ASCII)
_PERCENT_RE = re.compile(_NUMBER + r"\s*%", re.ASCII)


def parse_size(value: int | str, *, key: str, hint: str = SIZE_HINT) -> int:
    """Bytes from an int or a size string ("2GiB", "512MB", "1.5 GiB", "1000"); no "%" or "auto".

    KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; units are case-insensitive.
    `key` names the setting in the ConfigError raised for a bad value or one above MAX_BYTES.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key} = {shown(value)} is not a size; {hint}")
    if isinstance(value, int):
        number = value
    else:
        match = _SIZE_RE.fullmatch(value.strip().lower())
        if match is None:
            raise ConfigError(f"{key} = {shown(value)} is not a size; {hint}{_ascii_hint(value)}")
        sign, digits, unit = match.groups()
        if unit not in UNITS:
            raise ConfigError(
                f"{key} = {shown(value)} is not a size; {hint}; units are {UNIT_NAMES}"
            )
        if sign:
            raise ConfigError(f"{key} = {shown(value)} is negative; {hint}")
        number = int(Decimal(digits) * UNITS[unit])
    if number < 0:
        raise ConfigError(f"{key} = {shown(value)} is negative; {hint}")
    if number > MAX_BYTES:
        raise ConfigError(f"{key} = {shown(value)} is more than 8 EiB, past any machine; {hint}")
    return number


def parse_percent(value: str, *, key: str, hint: str) -> Decimal:
    """The number in "40%" (may be out of range: the caller checks); ConfigError if malformed."""
    match = _PERCENT_RE.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"{key} = {shown(value)} is not a size; {hint}{_ascii_hint(value)}")
    return Decimal(match.group(2)) * (-1 if match.group(1) else 1)


def format_size(num_bytes: int) -> str:
    """A short human form in powers of 1024, e.g. "3.20 GiB"; below 1 KiB, "512 B"."""
    if abs(num_bytes) >= 2**80:  # past any machine and a float's comfort: keep it short
        return f"{Decimal(num_bytes) / 2**40:.2E} TiB"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def _ascii_hint(value: str) -> str:
    if any(char.isdigit() and not char.isascii() for char in value):
        return " (write the digits as ASCII 0-9)"
    return ""
