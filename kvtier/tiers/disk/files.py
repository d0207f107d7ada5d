"""POSIX file mechanics of the block store: atomic durable writes, exact reads, quarantine.

Knows nothing of the block format or budgets; errors come back as OSError / EOFError for the
store to phrase.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)


def write_atomic(path: Path, buffers: list[bytes | memoryview]) -> None:
    """temp file in the target dir -> write -> fsync -> rename -> fsync dir; no temp left behind.

    A reader never sees a partial file. Raises OSError (the temp file removed).
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = -1
    renamed = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        for buffer in buffers:
            _write_all(fd, buffer)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, path)
        renamed = True
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    finally:
        if fd >= 0:
            os.close(fd)
        if not renamed:
            temp.unlink(missing_ok=True)


def read_exact_into(file: BinaryIO, offset: int, buffer: object) -> None:
    """Fill `buffer` (anything with the buffer protocol) from `offset`; EOFError if the file ends."""
    view = memoryview(buffer).cast("B")
    file.seek(offset)
    while view:
        count = file.readinto(view)
        if not count:
            raise EOFError(f"ends before byte {offset + len(view)}")
        view = view[count:]


def quarantine(path: Path, file: BinaryIO, folder: Path) -> Path | None:
    """Move the file we have open at `path` into `folder`, unless `path` was replaced meanwhile.

    Returns where it went, or None when it was already moved or deleted (another reader).
    """
    target = folder / f"{path.stem}.{secrets.token_hex(4)}{path.suffix}"
    try:
        opened, current = os.fstat(file.fileno()), os.stat(path)
        if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
            return None
        folder.mkdir(exist_ok=True)
        os.replace(path, target)
    except OSError as error:  # already moved or deleted by another reader
        log.debug("could not quarantine %s: %s", path, error)
        return None
    return target


def _write_all(fd: int, buffer: bytes | memoryview) -> None:
    view = memoryview(buffer).cast("B")
    while view:
        view = view[os.write(fd, view) :]
