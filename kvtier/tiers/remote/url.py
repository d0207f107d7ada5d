"""The [remote] table: a valkey:// or valkeys:// URL and its options, parsed once into a RemoteSpec.

Reads the password and HMAC key files it names, and nothing else; it never connects.
A password never appears in a message, a log line, repr() or redacted().
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from kvtier.errors import ConfigError, printable
from kvtier.errors import shown as quoted

log = logging.getLogger(__name__)

SCHEMES = {"valkey": False, "valkeys": True}  # scheme -> TLS
OPTIONS = (
    "url",
    "password_file",
    "ca_file",
    "cert_file",
    "key_file",
    "timeout_ms",
    "ttl_s",
    "hmac_key_file",
    "cluster",
)
DEFAULT_PORT = 6379
DEFAULT_TIMEOUT_MS = 500
MIN_HMAC_KEY_BYTES = 32  # HMAC-SHA256 keys shorter than the digest weaken it (RFC 2104, section 3)
_URL_HINT = "write valkey://[user:password@]host:port[/db] or host1:port1,host2:port2 for a cluster"
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_IPV6_RE = re.compile(r"\[([0-9A-Fa-f:.]+(?:%[A-Za-z0-9]+)?)\]")


@dataclass(frozen=True, slots=True)
class RemoteNode:
    """One server address; str() is host:port, with an IPv6 host in brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RemoteSpec:
    """Where the remote tier lives and how to talk to it; file paths are absolute."""

    nodes: tuple[RemoteNode, ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_source: str = "url"  # "url" or "password_file": which one to tell the user to fix
    db: int = 0
    cluster: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    ttl_s: int | None = None
    hmac_key: bytes | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The URL and options as one line, with the password and HMAC key shown as ***."""
        scheme = "valkeys" if self.tls else "valkey"
        user = self.username or ""
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        db = f"/{self.db}" if self.db else ""
        hosts = ",".join(str(node) for node in self.nodes)
        extras = [f"timeout_ms={self.timeout_ms}"]
        if self.ttl_s is not None:
            extras.append(f"ttl_s={self.ttl_s}")
        if self.cluster and len(self.nodes) == 1:
            extras.append("cluster=true")
        if self.hmac_key is not None:
            extras.append("hmac_key=***")
        return f"{scheme}://{auth}{hosts}{db} ({', '.join(extras)})"

    def __str__(self) -> str:
        return self.redacted()


def parse_remote(table: Mapping[str, object], *, base_dir: Path | None = None) -> RemoteSpec:
    """Parse the [remote] table; relative file paths are taken from `base_dir` (default: cwd).

    Raises ConfigError naming the key, its value (password shown as ***) and the fix.
    """
    _check_keys(table)
    url = table.get("url")
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"remote.url = {quoted(url)} is not a URL; {_URL_HINT}")
    spec = parse_url(url.strip())
    root = Path.cwd() if base_dir is None else Path(base_dir)
    password, source = _password(table, url, spec.password, root)
    tls_files = _tls_files(table, url, spec.tls, root)
    timeout_ms = _positive_int(table, "timeout_ms", DEFAULT_TIMEOUT_MS)
    ttl_s = _positive_int(table, "ttl_s", None)
    hmac_key = _hmac_key(table, root)
    cluster = _cluster(table, url, spec)
    result = RemoteSpec(
        nodes=spec.nodes,
        tls=spec.tls,
        username=spec.username,
        password=password,
        password_source=source,
        db=spec.db,
        cluster=cluster,
        ca_file=tls_files["ca_file"],
        cert_file=tls_files["cert_file"],
        key_file=tls_files["key_file"],
        timeout_ms=timeout_ms,
        ttl_s=ttl_s,
        hmac_key=hmac_key,
    )
    log.debug("remote tier: %s", result.redacted())
    return result


def _check_keys(table: Mapping[str, object]) -> None:
    for name in table:
        if name not in OPTIONS:
            close = difflib.get_close_matches(name, OPTIONS, n=1)
            hint = f"did you mean {quoted(close[0])}? " if close else ""
            raise ConfigError(
                f"unknown key 'remote.{name}'; {hint}[remote] takes: {', '.join(OPTIONS)}"
            )


def _password(
    table: Mapping[str, object], url: str, url_password: str | None, root: Path
) -> tuple[str | None, str]:
    """The password and its source ("url" or "password_file"); refuses one in each."""
    password_file = _path(table, "password_file", root)
    if password_file is None:
        return url_password, "url"
    if url_password is not None:
        raise ConfigError(
            f"remote.url = {quoted(redact_url(url))} has a password and remote.password_file = "
            f"'{printable(password_file)}' names another; keep one (password_file keeps it out "
            f"of configs)"
        )
    password = _read_secret(password_file, "password_file").decode()
    if not password:
        raise ConfigError(
            f"remote.password_file = '{printable(password_file)}' is empty; write the password "
            f"into it "
            "or drop the key for a server without a password"
        )
    return password, "password_file"


def _tls_files(
    table: Mapping[str, object], url: str, tls: bool, root: Path
) -> dict[str, Path | None]:
    """ca_file, cert_file and key_file, each a checked path or None; they need a valkeys:// URL."""
    tls_files = {name: _path(table, name, root) for name in ("ca_file", "cert_file", "key_file")}
    for name, path in tls_files.items():
        if path is not None and not tls:
            raise ConfigError(
                f"remote.{name} = '{printable(path)}' needs TLS but remote.url = "
                f"{quoted(redact_url(url))} is "
                "plain; use valkeys:// or drop the key"
            )
    if tls_files["key_file"] is not None and tls_files["cert_file"] is None:
        raise ConfigError(
            f"remote.key_file = '{printable(tls_files['key_file'])}' has no certificate; set "
            "remote.cert_file to the client certificate it belongs to"
        )
    return tls_files


def _hmac_key(table: Mapping[str, object], root: Path) -> bytes | None:
    hmac_key_file = _path(table, "hmac_key_file", root)
    if hmac_key_file is None:
        return None
    hmac_key = _read_secret(hmac_key_file, "hmac_key_file")
    if len(hmac_key) < MIN_HMAC_KEY_BYTES:
        raise ConfigError(
            f"remote.hmac_key_file = '{printable(hmac_key_file)}' holds {len(hmac_key)} bytes; "
            f"use at "
            f"least {MIN_HMAC_KEY_BYTES}, e.g. `openssl rand -hex 32 > {hmac_key_file}`"
        )
    return hmac_key


def _cluster(table: Mapping[str, object], url: str, spec: RemoteSpec) -> bool:
    """remote.cluster, by default true for a URL of several nodes; checked against the URL."""
    nodes = spec.nodes
    cluster = table.get("cluster", len(nodes) > 1)
    if not isinstance(cluster, bool):
        raise ConfigError(f"remote.cluster = {quoted(cluster)} is not a boolean; use true or false")
    if not cluster and len(nodes) > 1:
        raise ConfigError(
            f"remote.cluster = false but remote.url = {quoted(redact_url(url))} names {len(nodes)} "
            "nodes; name one node, or drop remote.cluster for a cluster"
        )
    if cluster and spec.db:
        raise ConfigError(
            f"remote.url = {quoted(redact_url(url))} selects db {spec.db}, which a cluster client "
            "cannot use; drop the /db part"
        )
    return cluster


def parse_url(url: str) -> RemoteSpec:
    """Parse the URL alone into a RemoteSpec with default options."""
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ConfigError(
            f"remote.url = {quoted(shown)} does not start with valkey:// or valkeys:// (TLS); "
            f"{_URL_HINT}"
        )
    tls = SCHEMES[scheme.lower()]
    # The last '@' ends the credentials, so a password may hold '@' or '/' without escaping.
    userinfo, at, hosts_and_db = rest.rpartition("@")
    if not at:
        userinfo, hosts_and_db = "", rest
    if "?" in hosts_and_db or "#" in hosts_and_db:
        raise ConfigError(
            f"remote.url = {quoted(shown)} has a query or fragment; set options as [remote] keys "
            "(password_file, ca_file, timeout_ms, ...) instead"
        )
    hosts, slash, db_text = hosts_and_db.partition("/")

    username: str | None = None
    password: str | None = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
        if colon and not password:
            raise ConfigError(
                f"remote.url = {quoted(shown)} has an empty password; drop the ':' or use "
                "remote.password_file"
            )
        if username is None and password is None:
            raise ConfigError(f"remote.url = {quoted(shown)} has an '@' but no user; {_URL_HINT}")

    nodes = tuple(_node(part, shown) for part in hosts.split(","))
    if len(set(nodes)) != len(nodes):
        raise ConfigError(f"remote.url = {quoted(shown)} names a node twice; list each node once")

    db = 0
    if slash and db_text:
        if not db_text.isdigit():
            raise ConfigError(
                f"remote.url = {quoted(shown)} has db {quoted(db_text)}, not a number; end the "
                f"URL with /0, "
                "/1, ... or nothing"
            )
        db = int(db_text)
    return RemoteSpec(
        nodes=nodes, tls=tls, username=username, password=password, db=db, cluster=len(nodes) > 1
    )


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, tail = rest.rpartition("@")
    if not sep or not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{tail}"


def _node(text: str, shown: str) -> RemoteNode:
    text = text.strip()
    if not text:
        raise ConfigError(f"remote.url = {quoted(shown)} has an empty host; {_URL_HINT}")
    ipv6 = _IPV6_RE.match(text)
    if ipv6:
        host, rest = ipv6.group(1), text[ipv6.end() :]
        if rest and not rest.startswith(":"):
            raise ConfigError(
                f"remote.url = {quoted(shown)}: {quoted(text)} is not [ipv6]:port; {_URL_HINT}"
            )
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        port_text = port_text if colon else None
        if not _HOST_RE.fullmatch(host):
            raise ConfigError(
                f"remote.url = {quoted(shown)} has host {quoted(host)}, not a host name or "
                f"address; "
                "IPv6 goes in brackets: valkey://[::1]:6379"
            )
    if port_text is None:
        return RemoteNode(host, DEFAULT_PORT)
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(
            f"remote.url = {quoted(shown)} has port {quoted(port_text)}; use a number from 1 to "
            f"65535, "
            "like cache1:6379"
        )
    return RemoteNode(host, int(port_text))


def _path(table: Mapping[str, object], name: str, root: Path) -> Path | None:
    value = table.get(name)
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise ConfigError(
            f"remote.{name} = {quoted(value)} is not a file path; give a path as a string"
        )
    path = Path(value).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ConfigError(
            f"remote.{name} = '{printable(path)}' is not a file; create it or fix the path"
        )
    return path


def _read_secret(path: Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"remote.{name} = '{printable(path)}' cannot be read ({exc.strerror}); check its "
            f"permissions"
        ) from None
    return data.rstrip(b"\r\n")  # editors and `echo` add a newline that is not part of the secret


def _positive_int(table: Mapping[str, object], name: str, default: int | None) -> int | None:
    value = table.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        unit = "milliseconds" if name.endswith("_ms") else "seconds"
        tail = "" if default is None else f" (default {default})"
        drop = " or drop the key for no expiry" if default is None else f" or drop the key{tail}"
        raise ConfigError(
            f"remote.{name} = {quoted(value)} is not a whole number of {unit} > 0; fix it{drop}"
        )
    return value
