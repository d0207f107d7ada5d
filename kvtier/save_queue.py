"""SaveQueue: a store's save batches run at most `save_writers` at once, the rest wait in order.

A Valkey server takes commands on one thread: more pipelines than it can keep busy only contend
(16-core H200 host, docs/remote.md), and a batch waiting for one would hold an I/O thread that disk
reads and prefix loads share. Waiting batches sit here, not on the pool. It queues and runs; it
never decides what to save.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any


class SaveQueue:
    """Runs `save(store, batch)` on `pool`, at most `store.save_writers` at once per store
    (a store without the attribute, or 0: every batch at once)."""

    def __init__(self, pool: Executor, save: Callable[[Any, list], None]) -> None:
        self._pool = pool
        self._save = save
        self._waiting: dict[int, collections.deque] = {}  # per store: batches not yet started
        self._running: collections.Counter[int] = collections.Counter()  # per store
        self._lock = threading.Lock()

    def submit(self, store: Any, batch: list) -> None:
        """Run `batch` now, or after the store's running batches."""
        writers = getattr(store, "save_writers", 0)
        if writers:
            with self._lock:
                if self._running[id(store)] >= writers:
                    self._waiting.setdefault(id(store), collections.deque()).append(batch)
                    return
                self._running[id(store)] += 1
        self._pool.submit(self._run, store, batch, writers)

    def _run(self, store: Any, batch: list | None, writers: int) -> None:
        """An I/O task: save `batch`, then the store's waiting batches while there are any."""
        while batch is not None:
            self._save(store, batch)
            if not writers:
                return
            with self._lock:
                waiting = self._waiting.get(id(store))
                batch = waiting.popleft() if waiting else None
                if not waiting:
                    self._waiting.pop(id(store), None)
                if batch is None:
                    self._running[id(store)] -= 1
                    if not self._running[id(store)]:
                        del self._running[id(store)]
