"""How kvtier reaches a Valkey server and phrases what went wrong, for the user and the log.

Builds valkey-py connection options (and the command packer that sends Parts unjoined) and
turns exceptions into causes and one-line RemoteErrors; it never opens a connection or sends a
command (client.py does).
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Sequence
from typing import Any

from kvtier.errors import RemoteError
from kvtier.tiers.remote.url import RemoteNode, RemoteSpec

Buffer = bytes | bytearray | memoryview

try:
    from valkey import exceptions as valkey_errors
    from valkey.backoff import NoBackoff
    from valkey.exceptions import (
        AskError,
        AuthenticationError,
        ClusterDownError,
        MovedError,
        NoPermissionError,
        OutOfMemoryError,
        ReadOnlyError,
        ResponseError,
        TryAgainError,
    )
    from valkey.retry import Retry
except ImportError:  # pragma: no cover - RemoteClient.connect() refuses first without the extra
    pass

# Every command kvtier sends, as ACL rules: the permission hints name exactly these (a test
# runs every call as a user granted only them, docs/remote.md shows it); +select is for a url
# with a /db.
ACL_COMMANDS = (
    "+get +set +mget +getrange +strlen +del +expire +object|idletime +scan +info +ping +select"
)
# What a cluster client sends besides: valkey-py's ValkeyCluster reads the slot map with
# CLUSTER SLOTS and, when it is made, the command table with COMMAND (its CommandsParser).
CLUSTER_ACL_COMMANDS = "+cluster|slots +command"

# Why each cause of a failed call matters to the user; the first of each is a warning.
CAUSES = {
    "unreachable": "is unreachable; reads miss and writes are dropped until it answers",
    "timeout": "did not answer within remote.timeout_ms = {timeout_ms}; reads miss, writes dropped",
    "out of memory": "is out of memory; writes fail: raise its maxmemory or use an eviction "
    "policy such as allkeys-lru",
    "no permission": "denied a command to this user; grant it {acl}",
    "moved": "moved slots to other nodes; refreshing the slot map (reads miss meanwhile)",
    "cluster down": "reports the cluster down; reads miss and writes are dropped until it is up",
    "read-only": "is a read-only replica; list the primaries in remote.url",
    "slot not covered": "has no node serving some hash slots; those keys miss",
    "credentials": "no longer accepts our user or password; check remote.password_file",
}


def repeats_outage(cause: str, warned: set[str]) -> bool:
    """Whether a warning of `cause` would tell of an outage told already: a failed connect
    ("connect", clients.try_connect) and a failed call ("unreachable") are the same outage."""
    outage = {"connect", "unreachable"}
    return cause in outage and bool(warned & outage)


def acl_rules(spec: RemoteSpec) -> str:
    """The ACL rules a user needs for `spec`'s server or cluster: what permission hints name."""
    return f"{ACL_COMMANDS} {CLUSTER_ACL_COMMANDS}" if spec.cluster else ACL_COMMANDS


def reason_for(cause: str, spec: RemoteSpec) -> str:
    """Why a failed call of `cause` matters, for the log line (CAUSES, filled in for `spec`)."""
    reason = CAUSES.get(cause, "answered an error; the call reads as misses / a failed put")
    return reason.format(timeout_ms=spec.timeout_ms, acl=acl_rules(spec))


def connection_options(spec: RemoteSpec) -> dict[str, Any]:
    """valkey-py keyword arguments shared by the standalone pool and the cluster's node clients."""
    timeout_s = spec.timeout_ms / 1000
    options: dict[str, Any] = {
        "username": spec.username,
        "password": spec.password,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        # valkey-py would retry a failed call on a fresh connection, doubling the wait a dead
        # server costs; the remote tier is a cache, so one try and a miss is the right answer.
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        # No CLIENT SETINFO round trips on each new connection.
        "lib_name": None,
        "lib_version": None,
    }
    if spec.tls:
        options |= {
            "ssl_ca_certs": str(spec.ca_file) if spec.ca_file else None,
            "ssl_certfile": str(spec.cert_file) if spec.cert_file else None,
            "ssl_keyfile": str(spec.key_file) if spec.key_file else None,
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,  # valkey-py's default is False
        }
        if spec.cluster:
            options["ssl"] = True
    return options


def encode(value: Any) -> Any:
    """Command arguments as the protocol needs them; buffers pass through uncopied."""
    if isinstance(value, bytes | memoryview):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError(f"cannot send {type(value).__name__} to valkey; use str, bytes or int")


class Parts:
    """One value given as buffers back to back (e.g. a header and tensors' own memory): a
    standalone server gets them as they are, without joining them into one bytes object (a
    copy at ~2.3 GB/s that halved 8 MiB writes on the 2-core dev box); a cluster's client,
    which keeps valkey-py's own packer, gets them joined."""

    __slots__ = ("buffers", "nbytes")

    def __init__(self, buffers: Sequence[Buffer]) -> None:
        self.buffers = tuple(memoryview(buffer).cast("B") for buffer in buffers)
        self.nbytes = sum(buffer.nbytes for buffer in self.buffers)

    def __len__(self) -> int:
        return self.nbytes

    def join(self) -> bytes:
        return b"".join(self.buffers)


def parts_packer(buffer_cutoff: int) -> Any:
    """valkey-py's Python command packer (which sends large values as they are, where
    libvalkey's copies each into one bytes object), extended to Parts arguments."""
    from valkey.connection import PythonRespSerializer

    class PartsPacker(PythonRespSerializer):
        """valkey-py's Python packer, plus Parts arguments: written as one bulk string whose
        buffers go to the socket one by one (valkey-py sends each memoryview chunk as it is)."""

        def pack(self, *args: Any) -> list[Any]:
            if not any(isinstance(arg, Parts) for arg in args):
                return super().pack(*args)
            output: list[Any] = []
            pending = b"*%d\r\n" % len(args)
            for arg in args:
                pieces = arg.buffers if isinstance(arg, Parts) else (self.encode(arg),)
                pending += b"$%d\r\n" % sum(len(piece) for piece in pieces)
                for piece in pieces:
                    if isinstance(piece, memoryview) or len(piece) > self._buffer_cutoff:
                        output += [pending, piece]
                        pending = b""
                    else:
                        pending += piece
                pending += b"\r\n"
            output.append(pending)
            return [chunk for chunk in output if len(chunk)]

    return PartsPacker(buffer_cutoff, encode)


IOV_MAX = 1024  # buffers one sendmsg takes (Linux's limit)


def buffers_connection() -> Any:
    """valkey-py's plain TCP Connection, writing a packed command's buffers with one sendmsg each
    round instead of one sendall per buffer (a block's value is a header and one buffer per
    layer). Each small buffer sent alone left as its own TCP segment (TCP_NODELAY): on loopback
    a value of 1 MiB in 11 sendalls cost ~25% more client CPU than in one (2-core dev box)."""
    import valkey

    class BuffersConnection(valkey.Connection):
        def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            if isinstance(command, str | bytes) or len(command) == 1:
                return super().send_packed_command(command, check_health)
            if not self._sock:
                self.connect()
            if check_health:
                self.check_health()
            try:
                send_buffers(self._sock, command)
            except TimeoutError:  # socket.timeout
                self.disconnect()
                raise valkey_errors.TimeoutError("Timeout writing to socket") from None
            except OSError as error:
                self.disconnect()
                raise valkey_errors.ConnectionError(f"Error writing to socket: {error}") from None
            except BaseException:
                self.disconnect()  # a command half written: the connection is unusable
                raise

    return BuffersConnection


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    """Write `buffers` back to back, as many per sendmsg as the kernel takes."""
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    first = 0
    while first < len(views):
        sent = sock.sendmsg(views[first : first + IOV_MAX])
        while first < len(views) and sent >= views[first].nbytes:
            sent -= views[first].nbytes
            first += 1
        if sent:
            views[first] = views[first][sent:]


def probe_options(spec: RemoteSpec, options: dict[str, Any]) -> dict[str, Any]:
    """`options` for a plain valkey.Valkey that pings one cluster node (it takes ssl=True)."""
    probe = dict(options)
    probe.pop("ssl", None)
    if spec.tls:
        probe["ssl"] = True
    return probe


class ServerUnavailable(RemoteError):
    """The server did not answer or refused the connection: it may come up later (a tier then
    runs with misses); a wrong password, host name or certificate will not fix itself."""


def connect_error(spec: RemoteSpec, node: RemoteNode, exc: BaseException) -> RemoteError:
    """One line that names the node, what went wrong and which [remote] key fixes it."""
    text = scrub(str(exc), spec)
    lowered = text.lower()
    user = spec.username or "default"
    source = f"remote.{spec.password_source}"
    if "without any password configured" in lowered:
        return RemoteError(
            f"valkey at {node} has no password for user '{user}' but {source} gives one: drop "
            "it, or set a password on the server"
        )
    if isinstance(exc, AuthenticationError) or "wrongpass" in lowered or "noauth" in lowered:
        if spec.password is None:
            return RemoteError(
                f"valkey at {node} requires a password for user '{user}': set "
                "remote.password_file (or user:password in remote.url)"
            )
        return RemoteError(
            f"valkey at {node} refused the password for user '{user}': check {source}"
        )
    if isinstance(exc, NoPermissionError):
        return RemoteError(
            f"valkey at {node} denied user '{user}' a command ({text}); grant it {acl_rules(spec)}"
        )
    cause = exc.__cause__ or exc.__context__
    if (
        isinstance(cause, socket.gaierror)
        or "name or service not known" in lowered
        or ("temporary failure in name resolution" in lowered)
    ):
        return RemoteError(
            f"cannot resolve valkey host '{node.host}': check the host name in remote.url"
        )
    if isinstance(cause, ssl.SSLCertVerificationError) or "certificate verify failed" in lowered:
        return RemoteError(
            f"valkey at {node} sent a TLS certificate we do not trust ({_ssl_reason(text)}): "
            "set remote.ca_file to the CA that signed it"
        )
    if isinstance(cause, ssl.SSLError) or "ssl" in lowered:
        return RemoteError(
            f"TLS with valkey at {node} failed ({_ssl_reason(text)}): check the server speaks "
            "TLS on that port, and remote.ca_file, cert_file and key_file"
        )
    if (
        isinstance(exc, valkey_errors.TimeoutError)
        or "timeout" in lowered
        or "timed out" in lowered
    ):
        hint = " (a plaintext port? use valkey://)" if spec.tls else ""
        return ServerUnavailable(
            f"valkey at {node} did not answer within remote.timeout_ms = {spec.timeout_ms}"
            f"{hint}: check the server is up and reachable, or raise timeout_ms"
        )
    if "connection refused" in lowered or f"error {errno.ECONNREFUSED} " in lowered:
        return ServerUnavailable(
            f"nothing listens at valkey {node} (connection refused): start the server or fix "
            "the port in remote.url"
        )
    transient = _transient(exc, lowered)
    if transient:
        return ServerUnavailable(
            f"valkey at {node} is not serving now ({transient}): check the server and the "
            "network to it"
        )
    if "closed by server" in lowered and not spec.tls:
        return RemoteError(
            f"valkey at {node} closed the connection at once: if it serves TLS, use valkeys://"
        )
    return RemoteError(f"cannot use valkey at {node}: {text}; check remote.url and the server log")


# Socket errors of a server or network that may come back (a host rebooting, a route flapping)
_TRANSIENT_ERRNOS = {
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
    errno.EHOSTDOWN: "host down",
    errno.ENETDOWN: "network down",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection broken",
}


def _transient(exc: BaseException, lowered: str) -> str | None:
    """What makes `exc` a server or network that may come back, or None."""
    for error in (exc, exc.__cause__, exc.__context__):
        number = getattr(error, "errno", None)
        if number in _TRANSIENT_ERRNOS:
            return _TRANSIENT_ERRNOS[number]
    for number, reason in _TRANSIENT_ERRNOS.items():
        if f"error {number} " in lowered or reason in lowered:
            return reason
    # a server up but not serving yet (valkey-py maps the LOADING and MASTERDOWN replies)
    if isinstance(exc, valkey_errors.BusyLoadingError):
        return "loading its dataset"
    if isinstance(exc, valkey_errors.MasterDownError):
        return "its primary is down"
    return None


def cause_of(error: BaseException) -> str:
    """The cause of a failed call or error reply: a key of CAUSES, "error reply" or a type name."""
    if isinstance(error, OutOfMemoryError):
        return "out of memory"
    if isinstance(error, NoPermissionError):
        return "no permission"
    if isinstance(error, MovedError | AskError | TryAgainError):
        return "moved"
    if isinstance(error, ClusterDownError):
        return "cluster down"
    if isinstance(error, valkey_errors.MasterDownError):
        return "unreachable"
    if isinstance(error, ReadOnlyError):
        return "read-only"
    if isinstance(error, valkey_errors.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(error, AuthenticationError):
        return "credentials"
    if isinstance(error, valkey_errors.ConnectionError | OSError):
        return "unreachable"
    if isinstance(error, ResponseError):
        return "error reply"
    return type(error).__name__


def scrub(text: str, spec: RemoteSpec) -> str:
    """`text` with the password replaced, in case a library put it in an error message."""
    if spec.password:
        text = text.replace(spec.password, "***")
    return text.strip().rstrip(".")


def _ssl_reason(text: str) -> str:
    """The OpenSSL reason inside a wrapped error, e.g. 'certificate verify failed'."""
    for marker in ("] ", "SSL: "):
        if marker in text:
            return text.rsplit(marker, 1)[-1].split(" (_ssl", 1)[0].strip("() .")
    return text
