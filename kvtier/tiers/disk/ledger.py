"""The store-wide budget: the lock, the ledger, surveys, sweeps of dead owners, and LRU GC.

Every process sharing a store takes `StoreLock` (flock(2) on `v1/lock`) to change the ledger
(the lock file's text: bytes of every file under `v1/`, counted once per inode, a temp file at
the bytes its writer reserved), to sweep what dead processes left, and to delete shared blocks.
The ledger is a running estimate that every survey replaces with the exact figure; only a
survey decides what to delete. Shared blocks are deleted here and nowhere else (quarantine
aside), least recently used first (mtime = last use, set by the store), never while a process
area links them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.errors import BudgetError
from kvtier.tiers.disk.areas import Owner, StoreLayout, block_id_of, parse_temp
from kvtier.tiers.disk.files import remove_tree

log = logging.getLogger(__name__)

UNKNOWN_TEMP_AGE_S = 3600  # a temp file whose writer cannot be told (older kvtier) is stale after
# A write that finds the store full collects down to this fraction of the budget, so that the
# next writes need no survey (each walks every file); `kvtier store gc` collects exactly.
LOW_WATER = 15 / 16


class Ledger:
    """The ledger text of a lock file we hold: one decimal line, bytes used by the store."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self) -> int | None:
        text = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None

    def write(self, used_bytes: int) -> None:
        data = f"{max(used_bytes, 0)}\n".encode()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))


@contextmanager
def store_lock(layout: StoreLayout) -> Iterator[Ledger]:
    """Hold the store's exclusive lock (blocking) and hand out its ledger; OSError if the lock
    file cannot be opened (a read-only store)."""
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield Ledger(fd)
    finally:
        os.close(fd)  # releases the lock


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file of a survey."""

    path: Path
    size: int
    mtime_ns: int
    inode: tuple[int, int]
    links: int


@dataclass(slots=True)
class Survey:
    """Everything under `v1/` at one moment (files may change as soon as it returns)."""

    shared: list[StoredFile] = field(default_factory=list)  # block files in the shared area
    areas: dict[str, list[StoredFile]] = field(default_factory=dict)  # owner tag -> its files
    temps: list[tuple[StoredFile, Owner | None, int]] = field(default_factory=list)
    strays: list[Path] = field(default_factory=list)  # neither block nor temp: not ours
    empty_shards: list[Path] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        sizes = {f.inode: f.size for f in self.shared}
        for files in self.areas.values():
            sizes.update((f.inode, f.size) for f in files)
        for temp, _, reserved in self.temps:
            sizes[temp.inode] = max(temp.size, reserved)
        return sum(sizes.values())


def survey(layout: StoreLayout) -> Survey:
    """List the store's files (a missing store is an empty survey)."""
    found = Survey()
    for entry in _entries(layout.tree):
        if entry.name == layout.proc.name and entry.is_dir(follow_symlinks=False):
            for area in _entries(Path(entry.path)):
                files = found.areas.setdefault(area.name, [])
                for item in _entries(Path(area.path)):
                    _place(found, item, files)
        elif len(entry.name) == 2 and entry.is_dir(follow_symlinks=False):
            items = list(_entries(Path(entry.path)))
            if not items:
                found.empty_shards.append(Path(entry.path))
            for item in items:
                _place(found, item, found.shared)
        elif entry.path != str(layout.lock):
            found.strays.append(Path(entry.path))
    for item in _entries(layout.root):  # the marker's temp file lives in the root
        if parse_temp(Path(item.path)) is not None:
            _place(found, item, found.shared)
    return found


def _place(found: Survey, item: os.DirEntry, blocks: list[StoredFile]) -> None:
    path = Path(item.path)
    try:
        stat = item.stat(follow_symlinks=False)
    except FileNotFoundError:
        return  # deleted while we looked
    info = StoredFile(
        path, stat.st_size, stat.st_mtime_ns, (stat.st_dev, stat.st_ino), stat.st_nlink
    )
    temp = parse_temp(path)
    if temp is not None:
        found.temps.append((info, *temp))
    elif block_id_of(path) is not None and item.is_file(follow_symlinks=False):
        blocks.append(info)
    else:
        found.strays.append(path)


def _entries(folder: Path) -> Iterator[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            yield from list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return


@dataclass(frozen=True, slots=True)
class Collected:
    """What one sweep + GC did; `used_bytes` is the exact figure after it."""

    used_bytes: int
    removed_blocks: int = 0
    freed_bytes: int = 0
    swept_areas: int = 0
    swept_temps: int = 0
    failures: tuple[str, ...] = ()


def sweep(layout: StoreLayout, found: Survey) -> tuple[int, int, list[str]]:
    """Delete the process areas and temp files of dead owners and empty shard folders (hold the
    lock). Returns (areas, temps, failures)."""
    areas = temps = 0
    failures: list[str] = []
    for tag in found.areas:
        owner = Owner.parse(tag)
        if owner is not None and not owner.alive():
            failures += remove_tree(layout.proc / tag)
            areas += 1
    now = time.time_ns()
    for temp, owner, _ in found.temps:
        if temp.path.parent.parent == layout.proc:
            continue  # inside an area: goes with it
        old = now - temp.mtime_ns > UNKNOWN_TEMP_AGE_S * 10**9
        if (owner is None and old) or (owner is not None and not owner.alive()):
            temps += _unlink(temp.path, failures)
            if layout.is_shard(temp.path.parent):
                _rmdir(temp.path.parent)
    for shard in found.empty_shards:
        _rmdir(shard)
    return areas, temps, failures


def collect(layout: StoreLayout, *, max_bytes: int | None) -> Collected:
    """Sweep, then delete unlinked shared blocks by least recent use until the store fits
    `max_bytes` (None: sweep only); writes the exact ledger. OSError if it cannot be locked."""
    with store_lock(layout) as ledger:
        return collect_locked(layout, ledger, max_bytes=max_bytes, target_bytes=max_bytes)


def collect_locked(
    layout: StoreLayout, ledger: Ledger, *, max_bytes: int | None, target_bytes: int | None
) -> Collected:
    """`collect` for a caller that holds the lock: when the store is over `max_bytes`, delete
    down to `target_bytes`."""
    found = survey(layout)
    areas, temps, failures = sweep(layout, found)
    if areas or temps:
        found = survey(layout)
    used = found.used_bytes
    removed = freed = 0
    if max_bytes is not None and target_bytes is not None and used > max_bytes:
        # a block another process links (links > 1) is in use: never collected
        for block in sorted((f for f in found.shared if f.links == 1), key=lambda f: f.mtime_ns):
            if used <= target_bytes:
                break
            if _unlink(block.path, failures):
                used, freed, removed = used - block.size, freed + block.size, removed + 1
                _rmdir(block.path.parent)
    ledger.write(used)
    if failures:
        log.warning("could not delete %d files in %s: %s", len(failures), layout.root, failures[0])
    return Collected(used, removed, freed, areas, temps, tuple(failures))


def reserve_bytes(layout: StoreLayout, *, file_bytes: int, max_bytes: int) -> None:
    """Count a file about to be written against the store-wide budget, collecting first if it
    would not fit; BudgetError if it still does not (OSError if the store cannot be locked)."""
    with store_lock(layout) as ledger:
        used = ledger.read()
        if used is None or used + file_bytes > max_bytes:
            room = max_bytes - file_bytes
            target = min(room, int(max_bytes * LOW_WATER) - file_bytes)
            used = collect_locked(layout, ledger, max_bytes=room, target_bytes=target).used_bytes
            if used + file_bytes > max_bytes:
                raise BudgetError(
                    f"disk store at {layout.root} holds {used} bytes, all in use by running "
                    f"processes, and a {file_bytes}-byte block does not fit its {max_bytes}-byte "
                    "budget; raise disk.budget or wait for the other processes to close"
                )
        ledger.write(used + file_bytes)


def release_bytes(layout: StoreLayout, file_bytes: int) -> None:
    """Take bytes that left the store off the ledger; never raises (the next survey corrects)."""
    try:
        with store_lock(layout) as ledger:
            used = ledger.read()
            if used is not None:
                ledger.write(used - file_bytes)
    except OSError as error:
        log.debug("ledger of %s not updated: %s", layout.root, error)


def _unlink(path: Path, failures: list[str]) -> int:
    try:
        path.unlink()
        return 1
    except FileNotFoundError:
        return 0
    except OSError as error:
        failures.append(f"{path}: {error.strerror}")
        return 0


def _rmdir(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (a writer got there first) or already gone
