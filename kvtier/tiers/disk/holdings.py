"""Holdings: the block files one DiskStore holds, in its process area, and their deletes.

A held file is the store's own (private) file or a hard link to a shared one: the link keeps
that block's data alive and marks it in use, so GC never takes it (ledger.py). Deletes never
raise: a file that cannot go now is retried at close(), and an area that outlives its process
is swept by the next open of the store. Nothing here reads or writes a block's bytes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kvtier.tiers.disk.areas import Owner, StoreLayout
from kvtier.tiers.disk.files import remove_tree, replace_link, touch
from kvtier.tiers.disk.ledger import release_bytes

log = logging.getLogger(__name__)

TOUCH_EVERY_S = 60  # a read refreshes a shared block's last use when it is older than this


class OnceLog:
    """Warn once per cause, then log that cause at DEBUG (thread-safe)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def first(self, cause: str) -> bool:
        """True the first time `cause` is asked about."""
        with self._lock:
            first = cause not in self._seen
            self._seen.add(cause)
        return first

    def warn(self, cause: str, message: str, *args: object) -> None:
        level = logging.WARNING if self.first(cause) else logging.DEBUG
        self._logger.log(level, message, *args)


@dataclass(slots=True)
class Held:
    """A block file a store holds: `path` is its name in the store's area (own file, or a hard
    link to the shared one), or the shared name itself where hard links fail (`pinned` False)."""

    path: Path
    size: int
    shared: bool
    pinned: bool = True


class Holdings:
    """The blocks one store holds, by id; `used_bytes` is the sum of their file sizes."""

    def __init__(self, layout: StoreLayout, owner: Owner, once: OnceLog) -> None:
        self.layout = layout
        self.area = layout.area(owner)
        self._once = once
        self._lock = threading.Lock()  # guards everything below
        self._held: dict[str, Held] = {}
        self._used_bytes = 0
        self._stranded: dict[Path, int] = {}  # files a delete failed on: close() tries again
        self.area.mkdir(parents=True, exist_ok=True)
        self._finalizer = weakref.finalize(self, _remove_area, self.area, os.getpid())

    def get(self, block_id: str) -> Held | None:
        with self._lock:
            return self._held.get(block_id)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used_bytes

    def track(self, block_id: str, held: Held) -> None:
        with self._lock:
            previous = self._held.pop(block_id, None)
            self._used_bytes += held.size - (previous.size if previous else 0)
            self._held[block_id] = held

    def untrack(self, block_id: str) -> Held | None:
        with self._lock:
            held = self._held.pop(block_id, None)
            if held is not None:
                self._used_bytes -= held.size
        return held

    def mark_shared(self, held: Held, *, size: int | None = None) -> None:
        """Record that the shared area has `held` now (`size`: of the file it links now)."""
        with self._lock:
            held.shared = True
            if size is not None:
                self._used_bytes += size - held.size
                held.size = size

    def link_shared(self, block_id: str) -> Held | None:
        """Hard-link the shared file of `block_id` into the area (not verified, not tracked);
        None if there is none. Where links fail, the shared name itself, unpinned."""
        shared = self.layout.shared(block_id)
        link = self.area / shared.name
        try:
            try:
                os.link(shared, link)
            except FileExistsError:  # a stale name of ours: a delete that failed earlier
                replace_link(shared, link)
            return Held(link, link.stat().st_size, shared=True)
        except FileNotFoundError:
            return None
        except OSError as error:  # no hard links on this file system, or not allowed
            self._once.warn(
                "links",
                "cannot hard-link blocks in %s (%s); shared blocks this process uses are not "
                "pinned against GC, so a read may miss",
                self.layout.root,
                error.strerror,
            )
        try:
            return Held(shared, shared.stat().st_size, shared=True, pinned=False)
        except FileNotFoundError:
            return None

    def release(self, held: Held) -> None:
        """Delete our name of a file we stopped holding (a shared one keeps its data for GC,
        with its last use recorded); never raises."""
        try:
            if held.shared:
                touch(held.path)  # its last use, for the least-recently-used GC
            if not held.pinned:
                return  # `path` is the shared name itself: GC's to delete
            links = os.stat(held.path).st_nlink
            os.unlink(held.path)
        except FileNotFoundError:
            return
        except OSError as error:
            with self._lock:
                self._stranded[held.path] = held.size
            self._once.warn(
                "delete", "could not delete %s (%s); close() tries again", held.path, error.strerror
            )
            return
        if links == 1:
            release_bytes(self.layout, held.size)

    def close(self) -> None:
        """Release every block and delete the area; never raises (the caller guards bugs)."""
        for block_id in self.ids():
            held = self.untrack(block_id)
            if held is not None:
                self.release(held)
        with self._lock:
            stranded = sum(self._stranded.values())
            self._stranded.clear()
        failures = remove_tree(self.area)
        if failures:
            log.warning(
                "could not delete %d files of %s (%s); the first open of this store after "
                "this process exits deletes them",
                len(failures),
                self.area,
                failures[0],
            )
        elif stranded:
            release_bytes(self.layout, stranded)
        self._finalizer.detach()


def note_use(file: BinaryIO, path: Path) -> None:
    """Refresh the last use of a shared block just read through `path`, at most every
    TOUCH_EVERY_S (a private file's recency matters to no one)."""
    stat = os.fstat(file.fileno())
    if stat.st_nlink > 1 or path.parent.parent.name != "proc":
        if time.time() - stat.st_mtime > TOUCH_EVERY_S:
            touch(path)


def _remove_area(area: Path, pid: int) -> None:
    """weakref.finalize: the area of a store never closed goes at exit (not in a fork child)."""
    if os.getpid() == pid:
        remove_tree(area)
