"""The [remote] table: each key checked like the rest, then the whole table by parse_remote.

Reads the password and HMAC key files parse_remote names; never connects (the tier does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvtier.config.keys import DEFAULTS, Layers
from kvtier.config.sources import fail, with_source
from kvtier.config.values import as_bool, as_int, as_path
from kvtier.errors import ConfigError, shown

if TYPE_CHECKING:
    from kvtier.tiers.remote.url import RemoteSpec

FILE_KEYS = ("password_file", "ca_file", "cert_file", "key_file", "hmac_key_file")
MAX_TIMEOUT_MS = 3_600_000
MAX_TTL_S = 2**31


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """The remote tier; `spec` is None when url is "" (no remote tier). File paths are absolute
    ("" for none); `cluster` is what parse_remote decided (true for a url of several nodes)."""

    url: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    timeout_ms: int = 500
    ttl_s: int = 0
    hmac_key_file: str = ""
    cluster: bool = False
    persist: bool = False
    spec: RemoteSpec | None = field(default=None, repr=False)


def as_remote(layers: Layers) -> RemoteConfig:
    url, source = layers["remote.url"]
    if not isinstance(url, str):
        fail(f"remote.url = {shown(url)} is not a URL; use 'valkey://host:6379' or ''", source)
    checked = RemoteConfig(
        url=url.strip(),
        timeout_ms=as_int(
            layers,
            "remote.timeout_ms",
            "a whole number of milliseconds > 0 (e.g. 500)",
            1,
            maximum=MAX_TIMEOUT_MS,
        ),
        ttl_s=as_int(
            layers,
            "remote.ttl_s",
            "a whole number of seconds >= 0 (0: no expiry)",
            0,
            maximum=MAX_TTL_S,
        ),
        cluster=as_bool(layers, "remote.cluster"),
        persist=as_bool(layers, "remote.persist"),
        **{name: _file(layers, name) for name in FILE_KEYS},
    )
    if not checked.url:
        _check_unused(layers, checked)
        return checked
    spec = _spec(layers, checked)
    return RemoteConfig(
        **{name: getattr(checked, name) for name in RemoteConfig.__dataclass_fields__}
        | {"cluster": spec.cluster, "spec": spec}
    )


def _file(layers: Layers, name: str) -> str:
    value, source = layers[f"remote.{name}"]
    if value == "":
        return ""
    return str(as_path(layers, f"remote.{name}", "give a file path as a string, or ''"))


def _check_unused(layers: Layers, checked: RemoteConfig) -> None:
    """A remote option set without a url is a mistake (a url lost in a merge): say so."""
    for name in RemoteConfig.__dataclass_fields__:
        key = f"remote.{name}"
        if name not in ("url", "spec") and getattr(checked, name) != DEFAULTS[key]:
            fail(
                f"{key} is set but remote.url is empty; set remote.url to the server, or drop "
                f"{key}",
                layers[key][1],
            )


def _spec(layers: Layers, checked: RemoteConfig) -> RemoteSpec:
    from kvtier.tiers.remote.url import parse_remote  # imports kvtier.tiers: only when used

    table: dict[str, object] = {"url": checked.url, "timeout_ms": checked.timeout_ms}
    table |= {name: getattr(checked, name) for name in FILE_KEYS if getattr(checked, name)}
    if checked.ttl_s:
        table["ttl_s"] = checked.ttl_s
    if checked.cluster or layers["remote.cluster"][1] != "default":
        table["cluster"] = checked.cluster  # else parse_remote decides from the url's nodes
    try:
        return parse_remote(table)
    except ConfigError as error:
        message = str(error)
        key = message.split(" ", 1)[0] if message.startswith("remote.") else "remote.url"
        key = key if key in layers else "remote.url"
        raise ConfigError(with_source(message, layers[key][1])) from None
