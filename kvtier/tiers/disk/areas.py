"""Where everything lives in a store, who owns a process area, and the store's format marker.

    <root>/store.json                       {"format_version": "2"}: the newest format written
    <root>/v1/lock                          flock(2) target; its text is the ledger (ledger.py)
    <root>/v1/<id[:2]>/<id>.safetensors     shared area: persisted blocks, by content id (of
                                            any format: the tree is format 1's, unchanged)
    <root>/v1/proc/<owner>/<id>.safetensors one process's blocks: its own files, or hard links
                                            to shared ones (a link pins the block against GC)
    <root>/quarantine/                      files that failed verification, moved aside

Names and identities only; nothing here creates, deletes or decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil

from kvtier.blocks import FORMAT_VERSION, READABLE_FORMATS
from kvtier.errors import KVTierError

# The tree's folder: named for format 1, whose layout every later format keeps (format 2 changed
# only what is inside a block file), so blocks of both formats share one budget, ledger and GC.
TREE = "v1"
BLOCK_SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
_ID_PATTERN = re.compile(r"[0-9A-Za-z_-]{2,128}")
_OWNER_PATTERN = re.compile(r"(\d+)-(\d+)-([0-9a-f]{8})-([0-9a-f]{4})")


def check_block_id(block_id: object) -> str:
    """`block_id` if it can name a file (2-128 of [0-9A-Za-z_-]); else KVTierError."""
    if not isinstance(block_id, str) or not _ID_PATTERN.fullmatch(block_id):
        raise KVTierError(f"block id {block_id!r} is not 2-128 characters of [0-9A-Za-z_-]")
    return block_id


def block_id_of(path: Path) -> str | None:
    """The block id a block file's name gives, or None if the name is not `<id>.safetensors`."""
    name = path.name
    if not name.endswith(BLOCK_SUFFIX):
        return None
    block_id = name[: -len(BLOCK_SUFFIX)]
    return block_id if _ID_PATTERN.fullmatch(block_id) else None


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """The paths of one store under `root`."""

    root: Path

    @property
    def tree(self) -> Path:
        return self.root / TREE

    @property
    def lock(self) -> Path:
        return self.tree / "lock"

    @property
    def proc(self) -> Path:
        return self.tree / "proc"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def marker(self) -> Path:
        return self.root / "store.json"

    def shared(self, block_id: str) -> Path:
        check_block_id(block_id)
        return self.tree / block_id[:2] / f"{block_id}{BLOCK_SUFFIX}"

    def area(self, owner: Owner) -> Path:
        return self.proc / owner.tag

    def is_shard(self, path: Path) -> bool:
        return path.parent == self.tree and len(path.name) == 2 and path.is_dir()


@dataclass(frozen=True, slots=True)
class Owner:
    """Who wrote a process area or a temp file: pid, process start time (centiseconds since the
    epoch), the machine and pid namespace (8 hex), and a per-store instance (4 hex)."""

    pid: int
    start_cs: int
    namespace: str
    instance: str

    @property
    def tag(self) -> str:
        return f"{self.pid}-{self.start_cs}-{self.namespace}-{self.instance}"

    @classmethod
    def current(cls) -> Owner:
        process = psutil.Process()
        return cls(os.getpid(), _start_cs(process), namespace(), secrets.token_hex(2))

    @classmethod
    def parse(cls, tag: str) -> Owner | None:
        match = _OWNER_PATTERN.fullmatch(tag)
        if match is None:
            return None
        pid, start, space, instance = match.groups()
        return cls(int(pid), int(start), space, instance)

    def alive(self) -> bool:
        """False only when this owner is surely gone: its pid is free, a zombie, or another
        process (another start time). An owner in another namespace counts as alive: its pid
        means nothing here."""
        if self.namespace != namespace():
            return True
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            return abs(_start_cs(process) - self.start_cs) <= 1
        except psutil.NoSuchProcess:
            return False
        except psutil.Error:  # AccessDenied: it exists
            return True


def namespace() -> str:
    """8 hex naming this kernel boot and pid namespace: pids compare only within one."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass  # not Linux: the host name alone
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=4).hexdigest()


def _start_cs(process: psutil.Process) -> int:
    return round(process.create_time() * 100)


def temp_name(target: Path, owner: Owner, reserved_bytes: int) -> str:
    """`.<target name>.<owner tag>.<bytes reserved>.tmp`: a sweep can tell whose and how big."""
    return f".{target.name}.{owner.tag}.{reserved_bytes}{TEMP_SUFFIX}"


def parse_temp(path: Path) -> tuple[Owner | None, int] | None:
    """(owner, reserved bytes) of a temp file's name; (None, 0) for a temp of an unknown writer
    (e.g. an older kvtier); None if the name is not a temp file's."""
    name = path.name
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    parts = name[1 : -len(TEMP_SUFFIX)].rsplit(".", 2)
    if len(parts) == 3 and parts[2].isdigit():
        owner = Owner.parse(parts[1])
        if owner is not None:
            return owner, int(parts[2])
    return None, 0


def check_format(layout: StoreLayout, *, writer: Owner | None) -> None:
    """Refuse a store whose marker names a format newer than this kvtier's; a `writer` writes a
    missing marker, and raises an older one to FORMAT_VERSION (the newest format written).

    A store of format 1 is this layout with blake2b-128 block files: they stay, are never
    reused (their ids differ), are still listed, verified and collected. KVTierError with the
    fix when the store is of a newer or unknown format, or the marker unreadable.
    """
    try:
        text = layout.marker.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as error:
        raise KVTierError(f"cannot read {layout.marker} ({error.strerror})") from error
    if not text.strip():  # none yet, or a writer killed between creating and filling it
        if writer is not None:
            _write_marker(layout, writer)
        return
    try:
        version = str(json.loads(text)["format_version"])
    except (ValueError, KeyError, TypeError) as error:
        raise KVTierError(
            f"{layout.marker} is not a kvtier store marker ({error!r}); is {layout.root} a "
            "kvtier store? Remove the file if so"
        ) from error
    if version not in READABLE_FORMATS:
        raise KVTierError(
            f"the store at {layout.root} was written by kvtier store format {version}; this "
            f"kvtier reads formats {', '.join(READABLE_FORMATS)}. Use a kvtier that reads format "
            f"{version}, or set disk.path to another directory"
        )
    if version != FORMAT_VERSION and writer is not None:
        _write_marker(layout, writer)  # older kvtiers now refuse it: they cannot read our files


def _write_marker(layout: StoreLayout, writer: Owner) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    temp = layout.root / temp_name(layout.marker, writer, 0)
    try:
        temp.write_text(json.dumps({"format_version": FORMAT_VERSION}) + "\n")
        os.replace(temp, layout.marker)
    finally:
        temp.unlink(missing_ok=True)
