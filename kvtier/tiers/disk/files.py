"""POSIX file mechanics of the block store: atomic durable writes, links, exact reads, quarantine.

Knows nothing of the block format, budgets or owners; errors come back as OSError / EOFError
for the store to phrase.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_IOV_MAX = 1024  # buffers one preadv takes (Linux's limit)
_preadv = getattr(os, "preadv", None)  # Linux, FreeBSD, macOS 11+
_NOWAIT = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14+
_MKDIR_ATTEMPTS = 4  # a sweep may remove an empty shard folder between our mkdir and our create


def write_atomic(path: Path, buffers: list[bytes | memoryview], *, temp_name: str) -> None:
    """temp file `temp_name` in the target dir -> write -> fsync -> rename -> fsync dir.

    A reader never sees a partial file; no temp is left behind unless the process dies.
    Raises OSError (the temp file removed).
    """
    temp = path.with_name(temp_name)
    fd = -1
    renamed = False
    try:
        fd = _create(temp)
        for buffer in buffers:
            _write_all(fd, buffer)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, path)
        renamed = True
        _fsync_dir(path.parent)
    finally:
        if fd >= 0:
            os.close(fd)
        if not renamed:
            temp.unlink(missing_ok=True)


def link_durable(source: Path, target: Path) -> bool:
    """Hard-link `source` as `target` (creating its folder) and fsync the folder.

    False if `target` already exists (then nothing changed); other failures raise OSError.
    """
    for attempt in range(_MKDIR_ATTEMPTS):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
            break
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not source.exists() or attempt == _MKDIR_ATTEMPTS - 1:
                raise
    _fsync_dir(target.parent)
    return True


def replace_link(source: Path, target: Path) -> None:
    """Make `target` a hard link to `source`, replacing what `target` was, atomically."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.link")
    os.link(source, temp)
    try:
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def touch(path: Path) -> None:
    """Set the file's mtime to now (the store's record of last use); failures are ignored."""
    try:
        os.utime(path)
    except OSError as error:  # read-only store, another user's file: recency is a hint
        log.debug("could not touch %s: %s", path, error)


def remove_tree(path: Path) -> list[str]:
    """Delete a folder and everything in it; returns what could not be deleted, and why."""
    failures: list[str] = []

    def note(function: object, name: str, info: object) -> None:
        error = info[1] if isinstance(info, tuple) else info
        if not (isinstance(error, OSError) and error.errno == errno.ENOENT):
            failures.append(f"{name}: {getattr(error, 'strerror', None) or error}")

    shutil.rmtree(path, onerror=note)
    return failures


def _create(temp: Path) -> int:
    for attempt in range(_MKDIR_ATTEMPTS):
        temp.parent.mkdir(parents=True, exist_ok=True)
        try:
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            if attempt == _MKDIR_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _fsync_dir(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_exact_into(file: BinaryIO, offset: int, buffer: object) -> None:
    """Fill `buffer` (anything with the buffer protocol) from `offset`; EOFError if the file ends."""
    view = memoryview(buffer).cast("B")
    file.seek(offset)
    while view:
        count = file.readinto(view)
        if not count:
            raise EOFError(f"ends before byte {offset + len(view)}")
        view = view[count:]


def read_views(fd: int, offset: int, views: list[memoryview]) -> None:
    """Fill `views` (flat byte views, in file order) from `offset` of the open file `fd`, back
    to back, with as few `preadv` calls as the kernel allows (one, from the page cache); the
    list is consumed. EOFError if the file ends first."""
    while views:
        if _preadv is None:  # no preadv (macOS before 11): a seek and a readv
            os.lseek(fd, offset, os.SEEK_SET)
            count = os.readv(fd, views[:_IOV_MAX])
        else:
            count = _preadv(fd, views[:_IOV_MAX], offset)
        if not count:
            raise EOFError(f"ends before byte {offset + sum(len(v) for v in views)}")
        offset += count
        while views and count >= len(views[0]):
            count -= len(views.pop(0))
        if count:
            views[0] = views[0][count:]


def in_page_cache(path: Path) -> bool | None:
    """Whether the page cache holds the first, middle and last pages of the file at `path` (a
    4 KiB read of each that must not wait for the disk: RWF_NOWAIT), so reading it whole runs at
    memory speed; None when there is no such file. False where the kernel cannot tell."""
    if _preadv is None or _NOWAIT is None:
        return None if not path.exists() else False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        page = bytearray(4096)
        for offset in dict.fromkeys((0, size // 2 & ~4095, max(size - 1, 0) & ~4095)):
            if _preadv(fd, [page], offset, _NOWAIT) <= 0:
                return False
        return True
    except OSError:  # BlockingIOError: not cached; EOPNOTSUPP/EINVAL: cannot tell
        return False
    finally:
        os.close(fd)


def quarantine(
    path: Path, file: BinaryIO, folder: Path, *, other_names: Iterable[Path] = ()
) -> Path | None:
    """Move the file we have open at `path` into `folder`, unless `path` was replaced meanwhile;
    remove any of `other_names` that are hard links to the same file.

    Returns where it went, or None when it was already moved or deleted (another reader).
    """
    target = folder / f"{path.stem}.{secrets.token_hex(4)}{path.suffix}"
    opened = os.fstat(file.fileno())
    moved = None
    for name in (path, *other_names):
        try:
            current = os.stat(name)
            if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
                continue
            if moved is None:
                folder.mkdir(exist_ok=True)
                os.replace(name, target)
                moved = target
            else:
                os.unlink(name)
        except OSError as error:  # already moved or deleted by another reader
            log.debug("could not quarantine %s: %s", name, error)
    return moved


def _write_all(fd: int, buffer: bytes | memoryview) -> None:
    view = memoryview(buffer).cast("B")
    while view:
        view = view[os.write(fd, view) :]
