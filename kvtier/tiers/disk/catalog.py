"""What a store holds, for people and `kvtier store`: every block with its header's facts, full
verification of every file, and clearing. Reads any store of this format or an older one (its
files checked with the checksum their header names); needs no model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kvtier.blocks import FORMAT_VERSION
from kvtier.errors import KVTierError
from kvtier.tiers.disk.areas import Owner, StoreLayout, block_id_of, check_format
from kvtier.tiers.disk.blockio import read_tensors
from kvtier.tiers.disk.files import quarantine
from kvtier.tiers.disk.format import Corrupt, Header, read_header
from kvtier.tiers.disk.ledger import (
    Collected,
    StoredFile,
    Survey,
    collect_locked,
    store_lock,
    survey,
    sweep,
)

log = logging.getLogger(__name__)


def open_layout(root: str | os.PathLike) -> StoreLayout:
    """The layout of the existing store at `root`; KVTierError if there is none or it is of
    another format."""
    layout = StoreLayout(Path(root).expanduser())
    if not layout.root.is_dir():
        raise KVTierError(f"no kvtier store at {layout.root} (not a directory)")
    check_format(layout, writer=None)
    if not layout.tree.is_dir() and not layout.marker.exists():
        raise KVTierError(
            f"no kvtier store at {layout.root} (no store.json, no {layout.tree.name}/); "
            "pass the directory that disk.path names"
        )
    return layout


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """One stored block. `where` is "shared" or the owner tag of the process area holding it;
    `users` counts process areas linking a shared block (in use: GC skips it)."""

    block_id: str
    path: Path
    where: str
    users: int
    file_bytes: int
    last_use_ns: int
    header: Header | None  # None: the header failed verification (`problem` says how)
    problem: str | None

    @property
    def model(self) -> str:
        if self.header is None:
            return "?"
        return str(self.header.labels.get("model_key") or self.header.fingerprint)

    @property
    def tokens(self) -> int | None:
        tokens = self.header.labels.get("tokens") if self.header else None
        return tokens if isinstance(tokens, int) else None

    @property
    def tokens_text(self) -> str:
        return "-" if self.tokens is None else str(self.tokens)

    @property
    def payload_bytes(self) -> int:
        return self.file_bytes - (self.header.data_start if self.header else 0)

    @property
    def ratio(self) -> float | None:
        """Raw bytes over payload bytes (1.0 for raw)."""
        if self.header is None:
            return None
        return self.header.raw_bytes / self.payload_bytes if self.payload_bytes > 0 else 1.0

    @property
    def place(self) -> str:
        """Where it lies, in words, for `kvtier store ls`."""
        if self.where == "shared":
            text = f"shared, in use by {self.users}" if self.users else "shared"
        else:
            owner = Owner.parse(self.where)
            text = f"process {owner.pid if owner else self.where}"
        if self.header is not None and self.header.format_version != FORMAT_VERSION:
            text += f", format {self.header.format_version} (never reused; gc takes it as it ages)"
        return f"{text} (bad: {self.problem})" if self.problem else text


@dataclass(frozen=True, slots=True)
class ModelTotal:
    """The blocks of one model (model_key, else fingerprint) in a store."""

    model: str
    blocks: int
    tokens: int
    file_bytes: int
    raw_bytes: int
    payload_bytes: int
    last_use_ns: int

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.payload_bytes if self.payload_bytes else None


def by_model(blocks: list[BlockInfo]) -> list[ModelTotal]:
    """Totals per model, by model name."""
    groups: dict[str, list[BlockInfo]] = {}
    for block in blocks:
        groups.setdefault(block.model, []).append(block)
    return [
        ModelTotal(
            model,
            len(group),
            sum(b.tokens or 0 for b in group),
            sum(b.file_bytes for b in group),
            sum(b.header.raw_bytes for b in group if b.header),
            sum(b.payload_bytes for b in group if b.header),
            max(b.last_use_ns for b in group),
        )
        for model, group in sorted(groups.items())
    ]


def list_blocks(layout: StoreLayout, found: Survey | None = None) -> list[BlockInfo]:
    """Every block file once: shared ones, then the private ones of process areas."""
    found = survey(layout) if found is None else found
    users: dict[tuple[int, int], int] = {}
    for files in found.areas.values():
        for item in files:
            users[item.inode] = users.get(item.inode, 0) + 1
    shared = {item.inode for item in found.shared}
    by_name = sorted(found.shared, key=lambda item: item.path.name)
    blocks = [_info(item, "shared", users.get(item.inode, 0)) for item in by_name]
    for tag, files in sorted(found.areas.items()):
        own = sorted((f for f in files if f.inode not in shared), key=lambda f: f.path.name)
        blocks += [_info(item, tag, 1) for item in own]
    return blocks


def _info(item: StoredFile, where: str, users: int) -> BlockInfo:
    block_id = block_id_of(item.path) or ""
    header, problem = None, None
    try:
        with open(item.path, "rb", buffering=0) as file:
            header = read_header(file, os.fstat(file.fileno()).st_size, block_id, None)
    except Corrupt as error:
        problem = str(error)
    except OSError as error:
        problem = f"unreadable: {error.strerror}"
    return BlockInfo(block_id, item.path, where, users, item.size, item.mtime_ns, header, problem)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A file that failed `verify`; `moved_to` is set when it was quarantined."""

    path: Path
    problem: str
    moved_to: Path | None = None


def verify(layout: StoreLayout, *, move_aside: bool) -> tuple[int, list[Verdict]]:
    """Check every checksum of every block file, and that nothing else lies in the tree.

    Returns (files checked, failures); with `move_aside` each bad file goes to quarantine/.
    A file deleted while we look (GC, a process closing) is skipped.
    """
    found = survey(layout)
    bad: list[Verdict] = []
    checked = 0
    seen: set[tuple[int, int]] = set()
    for item in [*found.shared, *(f for files in found.areas.values() for f in files)]:
        if item.inode in seen:
            continue
        seen.add(item.inode)
        checked += 1
        verdict = _verify_file(layout, item.path, move_aside=move_aside)
        if verdict is not None:
            bad.append(verdict)
    for path in found.strays:
        moved = _move_aside(layout, path) if move_aside else None
        bad.append(Verdict(path, "not a kvtier block or temp file", moved))
    return checked, bad


def _verify_file(layout: StoreLayout, path: Path, *, move_aside: bool) -> Verdict | None:
    block_id = block_id_of(path) or ""
    try:
        with open(path, "rb", buffering=0) as file:
            try:
                header = read_header(file, os.fstat(file.fileno()).st_size, block_id, None)
                read_tensors(file, block_id, header, None)
                return None
            except Corrupt as error:
                moved = None
                if move_aside:
                    names = [layout.shared(block_id)] if block_id else []
                    moved = quarantine(path, file, layout.quarantine, other_names=names)
                return Verdict(path, str(error), moved)
    except FileNotFoundError:
        return None
    except OSError as error:
        return Verdict(path, f"unreadable: {error.strerror}")


def _move_aside(layout: StoreLayout, path: Path) -> Path | None:
    try:
        with open(path, "rb") as file:
            return quarantine(path, file, layout.quarantine)
    except OSError as error:
        log.debug("could not move %s aside: %s", path, error)
        return None


def orphans(layout: StoreLayout, found: Survey | None = None) -> list[Path]:
    """Process areas and temp files whose owners are dead: what the next sweep deletes."""
    found = survey(layout) if found is None else found
    dead = [layout.proc / tag for tag in found.areas if _dead(Owner.parse(tag))]
    dead += [temp.path for temp, owner, _ in found.temps if _dead(owner)]
    return dead


def _dead(owner: Owner | None) -> bool:
    return owner is not None and not owner.alive()


def collect(layout: StoreLayout, *, max_bytes: int | None) -> Collected:
    """ledger.collect for `kvtier store gc`: KVTierError if the store cannot be locked."""
    try:
        with store_lock(layout) as ledger:
            return collect_locked(layout, ledger, max_bytes=max_bytes, target_bytes=max_bytes)
    except OSError as error:
        raise KVTierError(f"cannot lock {layout.lock} ({error.strerror})") from error


def clear(layout: StoreLayout) -> tuple[int, int]:
    """Delete every shared block, what dead processes left, and the quarantine; running
    processes keep the blocks they hold until they close. Returns (files deleted, held).
    KVTierError if the store cannot be changed."""
    try:
        return _clear(layout)
    except OSError as error:
        raise KVTierError(f"cannot clear {layout.root} ({error.strerror})") from error


def _clear(layout: StoreLayout) -> tuple[int, int]:
    deleted = 0
    with store_lock(layout) as ledger:
        found = survey(layout)
        areas, temps, _ = sweep(layout, found)
        for item in found.shared:
            try:
                item.path.unlink()
                deleted += 1
            except FileNotFoundError:
                pass
        for item in sorted(layout.quarantine.glob("*")):
            item.unlink(missing_ok=True)
            deleted += 1
        after = survey(layout)
        sweep(layout, after)  # the shard folders just emptied
        ledger.write(after.used_bytes)
    held = sum(len(files) for files in after.areas.values())
    return deleted + areas + temps, held
