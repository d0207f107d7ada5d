"""BlockReader: verified reads of the blocks one store can see (its own first, then shared),
header probes, and quarantine of what fails. A missing file is a MISSING result, never an error.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from kvtier.errors import KVTierError
from kvtier.tiers.disk.areas import StoreLayout
from kvtier.tiers.disk.blockio import bytes_read, read_tensors
from kvtier.tiers.disk.files import quarantine
from kvtier.tiers.disk.format import Corrupt, Header, ReadResult, read_header
from kvtier.tiers.disk.holdings import Holdings, OnceLog, note_use
from kvtier.tiers.disk.ledger import release_bytes

log = logging.getLogger(__name__)


class BlockReader:
    """Reads for one DiskStore; thread-safe. `stats()` counts bytes, seconds and outcomes."""

    def __init__(
        self, layout: StoreLayout, holdings: Holdings, fingerprint: str, once: OnceLog
    ) -> None:
        self.layout = layout
        self.holdings = holdings
        self._fingerprint = fingerprint
        self._once = once
        self._lock = threading.Lock()
        self._counters = {"bytes_read": 0, "read_s": 0.0, "quarantined": 0, "missing": 0}
        self._quarantined: set[str] = set()  # blocks this reader moved aside

    def stats(self) -> dict[str, object]:
        with self._lock:
            return dict(self._counters)

    def read(
        self,
        block_id: str,
        names: list[str] | None,
        outs: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[ReadResult, dict[str, torch.Tensor] | None]:
        """Tensors `names` (None: all) of the block, into `outs` where given (blockio)."""
        started = time.perf_counter()
        opened = self._open(block_id)
        if opened is None:
            with self._lock:
                self._counters["missing"] += 1
            return ReadResult.MISSING, None
        file, path = opened
        with file:
            try:
                header = self._parse(file, block_id)
                tensors = read_tensors(file, block_id, header, names, outs)
            except Corrupt as error:
                self._quarantine(block_id, file, path, error)
                return ReadResult.CORRUPT, None
            note_use(file, path)
        with self._lock:
            self._counters["bytes_read"] += bytes_read(header, tensors)
            self._counters["read_s"] += time.perf_counter() - started
        return ReadResult.OK, tensors

    def was_quarantined(self, block_id: str) -> bool:
        """Whether this reader moved a file of `block_id` aside (it failed verification)."""
        with self._lock:
            return block_id in self._quarantined

    def probe(self, block_id: str) -> ReadResult:
        """Header-only check of the file a read would use."""
        opened = self._open(block_id)
        if opened is None:
            return ReadResult.MISSING
        return self._probe_open(block_id, *opened)

    def probe_path(self, block_id: str, path: Path) -> ReadResult:
        """Header-only check of one path."""
        try:
            file = open(path, "rb", buffering=0)
        except FileNotFoundError:
            return ReadResult.MISSING
        return self._probe_open(block_id, file, path)

    def _probe_open(self, block_id: str, file: BinaryIO, path: Path) -> ReadResult:
        with file:
            try:
                self._parse(file, block_id)
            except Corrupt as error:
                self._quarantine(block_id, file, path, error)
                return ReadResult.CORRUPT
        return ReadResult.OK

    def _parse(self, file: BinaryIO, block_id: str) -> Header:
        return read_header(file, os.fstat(file.fileno()).st_size, block_id, self._fingerprint)

    def paths(self, block_id: str) -> list[Path]:
        """Where a file of the block may be, in the order reads look: our copy if we hold one,
        then the shared one."""
        held = self.holdings.get(block_id)
        return list(dict.fromkeys([*([held.path] if held else []), self.layout.shared(block_id)]))

    def _open(self, block_id: str) -> tuple[BinaryIO, Path] | None:
        """Our copy of the block if we hold one, else the shared one; None if neither exists."""
        held = self.holdings.get(block_id)
        for path in self.paths(block_id):
            try:
                return open(path, "rb", buffering=0), path
            except FileNotFoundError:
                if held is not None and path == held.path:
                    self.holdings.untrack(block_id)
                    self._once.warn(
                        "vanished",
                        "disk block %s vanished from %s (deleted outside this store?); "
                        "read as a miss",
                        block_id,
                        path,
                    )
            except OSError as error:
                raise KVTierError(
                    f"cannot read block {block_id} in {self.layout.root} ({error.strerror}); "
                    "check the permissions of disk.path"
                ) from error
        return None

    def _quarantine(self, block_id: str, file: BinaryIO, path: Path, error: Corrupt) -> None:
        """Move the corrupt file we have open aside, with every store name it has; warn once."""
        held = self.holdings.get(block_id)
        opened = os.fstat(file.fileno())
        names = {path, self.layout.shared(block_id), *([held.path] if held else [])}
        ours = held is not None and _same_file(held.path, opened)
        target = quarantine(path, file, self.layout.quarantine, other_names=names - {path})
        if ours:
            self.holdings.untrack(block_id)
        if target is not None:
            release_bytes(self.layout, opened.st_size)
        with self._lock:
            self._counters["quarantined"] += target is not None
            self._quarantined.add(block_id)
        first = self._once.first(f"corrupt: {error.cause}")
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "disk block %s failed verification (%s); %s, read as a miss%s",
            path,
            error,
            f"moved to {target}" if target is not None else "left in place",
            "; further failures of this kind log at DEBUG" if first else "",
        )


def _same_file(path: Path, opened: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(path), opened)
    except OSError:
        return False
