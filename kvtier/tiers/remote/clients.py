"""ThreadClients: one RemoteClient per thread for a tier (a client is not thread-safe).

Connects lazily in each thread; a thread that cannot connect reads misses and tries again later.
Which servers could not be reached is remembered for the whole process (`DOWN`): a cache built
while its server is down connects no sooner than the last failure's backoff allows (1 s, then
doubling to 30 s), so a process that builds a cache per request pays a connect timeout once a
backoff, not once a request, and warns once an outage, not once a cache.
"""

from __future__ import annotations

import logging
import threading
import time

from kvtier.errors import KVTierError
from kvtier.tiers.remote.client import RETRY_AFTER_S, RemoteClient
from kvtier.tiers.remote.connect import ServerUnavailable, repeats_outage
from kvtier.tiers.remote.url import RemoteSpec

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0


class DownServers:
    """Servers this process could not connect to (when it may try again, how long it waited
    last) and those it has reached. Thread-safe; one per process (`DOWN`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, tuple[float, float]] = {}  # server -> (retry at, backoff s)
        self._reached: set[str] = set()

    def wait_s(self, spec: RemoteSpec) -> float:
        """Seconds until the server may be tried again (0: now)."""
        with self._lock:
            retry_at, _ = self._down.get(spec.redacted(), (0.0, 0.0))
        return max(0.0, retry_at - time.monotonic())

    def failed(self, spec: RemoteSpec) -> bool:
        """Note a failed connect; True if it starts an outage (the one to warn about)."""
        with self._lock:
            _, backoff = self._down.get(spec.redacted(), (0.0, 0.0))
            backoff = min(MAX_BACKOFF_S, max(RETRY_AFTER_S, 2 * backoff))
            self._down[spec.redacted()] = (time.monotonic() + backoff, backoff)
            return backoff == RETRY_AFTER_S

    def up(self, spec: RemoteSpec) -> None:
        with self._lock:
            self._down.pop(spec.redacted(), None)
            self._reached.add(spec.redacted())

    def reached(self, spec: RemoteSpec) -> bool:
        """Whether a connect to the server succeeded in this process."""
        with self._lock:
            return spec.redacted() in self._reached

    def clear(self) -> None:
        with self._lock:
            self._down.clear()
            self._reached.clear()


DOWN = DownServers()


def check_now(spec: RemoteSpec) -> None:
    """Connect once when a cache is made, so what will not fix itself (a wrong password, an
    unknown host, an untrusted certificate) is one RemoteError line there, not at the first
    forward; a server that is down only warns (and is remembered). Once per server a process."""
    if not DOWN.reached(spec):
        client = try_connect(spec, set())
        if client is not None:
            client.close()


def try_connect(
    spec: RemoteSpec, warned: set[str], *, survive: type[Exception] = ServerUnavailable
) -> RemoteClient | None:
    """A new client; None when the server is down or was down moments ago (DOWN's backoff), or
    the connect raised `survive`: it may come up. One warning an outage (and none once `warned`
    holds "connect" or a client's "unreachable"). Other errors raise: by default credentials, host names and certificates,
    which will not fix themselves."""
    if DOWN.wait_s(spec) > 0:
        warned.add("connect")
        return None
    try:
        client = RemoteClient.connect(spec, warned=warned)
    except survive as error:
        outage = DOWN.failed(spec)
        told = repeats_outage("connect", warned)  # or a call ("unreachable") saw it first
        level = logging.WARNING if outage and not told else logging.DEBUG
        warned.add("connect")
        log.log(level, "remote tier: %s; reads miss and writes are dropped until it answers", error)
        return None
    DOWN.up(spec)
    return client


class ThreadClients:
    """One RemoteClient per thread (a client is not thread-safe), made on first use; a thread
    that cannot connect reads misses and retries after RETRY_AFTER_S. Warnings are shared."""

    def __init__(self, spec: RemoteSpec, first: RemoteClient | None, warned: set[str]) -> None:
        """`first` is the building thread's client, None when the server was down then."""
        self.spec = spec
        self._warned = warned
        self._local = threading.local()
        self._local.client = first
        self._all = [first] if first is not None else []
        self._lock = threading.Lock()
        self._failed_at = -float("inf") if first is not None else time.monotonic()

    def get(self) -> RemoteClient | None:
        client = getattr(self._local, "client", None)
        if client is not None or time.monotonic() - self._failed_at < RETRY_AFTER_S:
            return client
        # mid-run nothing raises: a password changed on the server is misses too
        client = try_connect(self.spec, self._warned, survive=KVTierError)
        if client is None:
            self._failed_at = time.monotonic()
            return None
        with self._lock:
            self._all.append(client)
        self._local.client = client
        return client

    def error_counts(self) -> dict[str, int]:
        """Failed server calls by cause, summed over the threads' clients."""
        with self._lock:
            clients = list(self._all)
        counts: dict[str, int] = {}
        for client in clients:
            for cause, count in client.error_counts.items():
                counts[cause] = counts.get(cause, 0) + count
        return counts

    def close(self) -> None:
        with self._lock:
            clients, self._all = self._all, []
        for client in clients:
            try:
                client.close()
            except Exception:  # close never raises: a dead socket is closed enough
                log.debug("remote tier: closing a client failed", exc_info=True)
