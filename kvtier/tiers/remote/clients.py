"""ThreadClients: one RemoteClient per thread for a tier (a client is not thread-safe).

Connects lazily in each thread; a thread that cannot connect reads misses and tries again later.
"""

from __future__ import annotations

import logging
import threading
import time

from kvtier.errors import KVTierError
from kvtier.tiers.remote.client import RETRY_AFTER_S, RemoteClient
from kvtier.tiers.remote.url import RemoteSpec

log = logging.getLogger(__name__)


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
        try:
            client = RemoteClient.connect(self.spec, warned=self._warned)
        except KVTierError as error:
            self._failed_at = time.monotonic()
            level = logging.DEBUG if "connect" in self._warned else logging.WARNING
            self._warned.add("connect")
            log.log(level, "remote tier: %s; reads miss and writes are dropped meanwhile", error)
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
