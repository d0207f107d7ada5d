"""This machine's measured speeds, as `kvtier bench` saved them, and the figures assumed without.

Reads and writes one JSON file ($XDG_CACHE_HOME/kvtier/bench.json); never measures
(kvtier/bench.py does). `codec = "auto"` (tiers/codec.py) and `kvtier plan` read it here.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtier.machine import nearest_existing

if TYPE_CHECKING:
    from kvtier.tiers.remote.url import RemoteSpec

log = logging.getLogger(__name__)

BENCH_FORMAT = 1
# Assumed when nothing is measured: the lent H100 host's virtio disk (write+fsync, cold read)
# and its pageable H2D copies (pinned reached 55 GB/s), DESIGN.md section 8. Conservative for
# the H2D side; a laptop SSD may be slower than this disk: run `kvtier bench`.
ASSUMED_DISK_WRITE_GBPS = 1.3
ASSUMED_DISK_READ_GBPS = 1.9
ASSUMED_COPY_GBPS = 10.0
# A block file the page cache holds, read and verified: the H200 host read its cached pages at
# 5.0 GB/s on one thread (`kvtier bench`) and prefix loads of 3.9 GB from the page cache took
# 0.95-1.15 s through the whole load path (docs/benchmarks.md); kept below both.
ASSUMED_PAGE_CACHE_GBPS = 3.0
# A Valkey server on a 10 GbE link, checks included. Kept low on purpose: loads on loopback in
# the 2-core container measured 0.35-0.45 GB/s with block format 1 (blake2b the bottleneck) and
# 0.6-0.8 with format 2's xxh3-128 (valkey-py's reply parser the bottleneck; docs/remote.md),
# but a shared server, a slower link or sha256 (signed values) cost more, and a tier's own
# load_gbps replaces this prior after its first load.
ASSUMED_REMOTE_GBPS = 0.3
ASSUMED = "assumed (DESIGN.md section 8 figures, not this machine: run `kvtier bench`)"


@dataclass(frozen=True, slots=True)
class Speed:
    """A bandwidth in GB/s (1e9 bytes) and where the figure comes from (`source`, for people)."""

    gbps: float
    source: str  # "measured at PATH on DATE", "measured on DATE" or ASSUMED
    measured: bool


ASSUMED_CACHED_READ = Speed(ASSUMED_PAGE_CACHE_GBPS, ASSUMED, False)


@dataclass(frozen=True, slots=True)
class DiskSpeeds:
    write: Speed
    read: Speed  # one file after another, cold
    load: Speed  # as a prefix load reads: one file per I/O thread at once, cold
    cached: Speed = ASSUMED_CACHED_READ  # from the page cache


def bench_file() -> Path:
    """Where `kvtier bench` saves: $XDG_CACHE_HOME/kvtier/bench.json, else ~/.cache/kvtier/."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kvtier" / "bench.json"


def read_bench(path: Path | None = None) -> dict[str, Any] | None:
    """The saved measurements, or None when there are none (or they are unreadable: a warning)."""
    path = bench_file() if path is None else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s (%s); run `kvtier bench` to measure again", path, exc)
        return None
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        log.warning("ignoring %s: not a format-%d kvtier bench file", path, BENCH_FORMAT)
        return None
    return data


def write_bench(results: dict[str, Any], path: Path | None = None) -> Path:
    """Save `results` (kvtier/bench.py's JSON) atomically; disk entries measured earlier on
    other file systems, and remote entries of other servers, are kept, so one file covers
    every store path and server measured. A remote entry with an error is not saved."""
    path = bench_file() if path is None else path
    previous = read_bench(path) or {}
    devices = {entry.get("device") for entry in results.get("disk", [])}
    kept = [entry for entry in previous.get("disk", []) if entry.get("device") not in devices]
    data = {**results, "format": BENCH_FORMAT, "disk": kept + list(results.get("disk", []))}
    # a server that did not answer keeps what was measured on it before
    servers = [entry for entry in results.get("remote", []) if "load_gbps" in entry]
    nodes = {entry.get("nodes") for entry in servers}
    others = [entry for entry in previous.get("remote", []) if entry.get("nodes") not in nodes]
    data["remote"] = others + servers
    _write_json(path, data)
    forget_learned("loads", path.with_name("learned.json"))  # relative to the old figures
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (a temp file in the same folder, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(data, indent=2) + "\n")
    os.chmod(temp, 0o644)  # mkstemp makes it private; speeds are no secret
    os.replace(temp, path)


def file_system_id(path: str | os.PathLike[str]) -> int:
    """The device number of the file system that holds `path` (or would, once created)."""
    return nearest_existing(path).stat().st_dev


def disk_speeds(store: str | os.PathLike[str], *, bench: dict | None = None) -> DiskSpeeds:
    """Write+fsync and read speeds of the file system holding `store`: measured there by
    `kvtier bench` (any path on the same file system), else ASSUMED."""
    bench = read_bench() if bench is None else bench
    entry = None
    if bench is not None:
        device = file_system_id(store)
        entry = next((e for e in bench.get("disk", []) if e.get("device") == device), None)
    if entry is None:
        read = Speed(ASSUMED_DISK_READ_GBPS, ASSUMED, False)
        return DiskSpeeds(Speed(ASSUMED_DISK_WRITE_GBPS, ASSUMED, False), read, read)
    source = f"measured at {entry.get('path')} on {str(entry.get('measured_at', '?'))[:10]}"
    read = Speed(float(entry["read_gbps"]), source, True)
    load = read
    if entry.get("parallel_read_gbps"):  # bench files before it have none
        threads = f"{source}, {entry.get('read_threads')} threads"
        load = Speed(float(entry["parallel_read_gbps"]), threads, True)
    cached = ASSUMED_CACHED_READ
    if entry.get("cached_read_gbps"):
        cached = Speed(float(entry["cached_read_gbps"]), f"{source}, page cache", True)
    return DiskSpeeds(Speed(float(entry["write_gbps"]), source, True), read, load, cached)


def copy_speed(copy_bytes: int, *, kind: str, bench: dict | None = None) -> Speed:
    """GB/s of one copy of `copy_bytes` of `kind` ("pinned_h2d", "host_memcpy", ...), from the
    measured size closest below it (or the smallest measured), else ASSUMED."""
    bench = read_bench() if bench is None else bench
    rows = [] if bench is None else [c for c in bench.get("copies", []) if c.get("kind") == kind]
    if not rows:
        return Speed(ASSUMED_COPY_GBPS, ASSUMED, False)
    rows.sort(key=lambda c: c["bytes"])
    below = [c for c in rows if c["bytes"] <= copy_bytes]
    row = below[-1] if below else rows[0]
    source = f"measured on {str(bench.get('measured_at', '?'))[:10]} ({kind.replace('_', ' ')})"
    return Speed(float(row["gbps"]), source, True)


def remote_nodes(spec: RemoteSpec) -> str:
    """What a remote measurement is filed under: the server addresses and database, no secrets
    (another process configured for the same server finds it)."""
    return ",".join(str(node) for node in spec.nodes) + f"/{spec.db}"


def remote_speed(spec: RemoteSpec, *, bench: dict | None = None) -> Speed:
    """GB/s of loading blocks from the server `spec` names, as `kvtier bench` measured it (with
    the block checks), else ASSUMED_REMOTE_GBPS with source "assumed"."""
    bench = read_bench() if bench is None else bench
    nodes = remote_nodes(spec)
    entries = [] if bench is None else bench.get("remote", [])
    entry = next((e for e in entries if e.get("nodes") == nodes and "load_gbps" in e), None)
    if entry is None:
        return Speed(ASSUMED_REMOTE_GBPS, "assumed", False)
    date = str(entry.get("measured_at", "?"))[:10]
    return Speed(float(entry["load_gbps"]), f"measured by kvtier bench on {date}", True)


# What generate() calls measured in earlier processes on this machine, next to bench.json: the
# fastest prefill FLOP/s of each model on each device, and how long prefix loads took against
# their prediction per tier (a new process would otherwise start from assumed figures).
LEARNED_FORMAT = 1


def learned_file() -> Path:
    return bench_file().with_name("learned.json")


def prefill_key(device: str, fingerprint: str) -> str:
    """What a model's prefill speed is filed under: the device's name and the model's KV
    fingerprint (its weights, config and dtype)."""
    return f"{device}|{fingerprint}"


def load_key(device: str, tier: str) -> str:
    """What the load calibration of a tier is filed under, for loads onto `device`."""
    return f"{device}|{tier}"


def _read_learned(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("format") == LEARNED_FORMAT:
            return {k: v for k, v in data.items() if isinstance(v, dict)}
    except (OSError, ValueError):
        pass  # missing, unreadable or another format: learned again by the next calls
    return {}


def learned(section: str, path: Path | None = None) -> dict[str, tuple[float, str]]:
    """Every (value, date measured) saved under `section` ("prefill": FLOP/s, "loads":
    measured over predicted seconds), by key; one read of the file."""
    flush_learned()  # this process's own figures first
    entries = _read_learned(learned_file() if path is None else path).get(section, {})
    return {key: value for key, entry in entries.items() if (value := _entry(entry)) is not None}


def _entry(entry: object) -> tuple[float, str] | None:
    """(value, date) of one saved entry; None for a broken one (learned again by the next call)."""
    try:
        return float(entry["value"]), str(entry["measured_at"])[:10]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None


def read_learned(section: str, key: str, path: Path | None = None) -> tuple[float, str] | None:
    """(value, date measured) saved under `section` and `key`, or None."""
    return learned(section, path).get(key)


def save_learned(
    section: str, key: str, value: float, *, only_if_higher: bool = False, path: Path | None = None
) -> bool:
    """Keep `value` under `section` / `key` (with `only_if_higher`, only if it beats the saved
    one); True if saved. Atomic; never raises: a learned figure is a hint."""
    path = learned_file() if path is None else path
    data = _read_learned(path)
    saved = _entry(data.get(section, {}).get(key))
    if only_if_higher and saved is not None and saved[0] >= value:
        return False
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    data.setdefault(section, {})[key] = {"value": value, "measured_at": now}
    try:
        _write_json(path, {"format": LEARNED_FORMAT, **data})
    except OSError as exc:
        log.debug("could not save %s to %s: %s", section, path, exc)
        return False
    return True


_LEARNED_WRITER: ThreadPoolExecutor | None = None  # one thread: writes land in order
_LEARNED_PENDING: list[Future] = []
_LEARNED_LOCK = threading.Lock()


def save_learned_soon(
    section: str, key: str, value: float, *, only_if_higher: bool = False
) -> None:
    """`save_learned` on a thread of its own, so a prefix load or a prefill does not wait for
    the file system (on the H200 a rename of learned.json waited 0.4 s behind the store's
    fsyncs, inside a reused prompt's time to first token). `flush_learned` waits for it; the
    readers here do, and so does a closing cache; the interpreter does at exit."""
    global _LEARNED_WRITER
    path = learned_file()  # where it belongs now ($XDG_CACHE_HOME may change later)
    with _LEARNED_LOCK:
        if _LEARNED_WRITER is None:
            _LEARNED_WRITER = ThreadPoolExecutor(1, thread_name_prefix="kvtier-learned")
        try:
            pending = _LEARNED_WRITER.submit(
                save_learned, section, key, value, only_if_higher=only_if_higher, path=path
            )
        except RuntimeError:  # the interpreter is shutting down: write it here
            pending = None
        _LEARNED_PENDING[:] = [f for f in _LEARNED_PENDING if not f.done()]
        if pending is not None:
            _LEARNED_PENDING.append(pending)
            return
    save_learned(section, key, value, only_if_higher=only_if_higher, path=path)


def flush_learned() -> None:
    """Wait for the figures `save_learned_soon` queued (save_learned never raises)."""
    with _LEARNED_LOCK:
        pending, _LEARNED_PENDING[:] = list(_LEARNED_PENDING), []
    for future in pending:
        future.result()


def forget_learned(section: str, path: Path | None = None) -> None:
    """Drop a section (a new `kvtier bench` makes the saved load calibrations stale)."""
    flush_learned()  # a figure still queued would come back after the drop
    path = learned_file() if path is None else path
    data = _read_learned(path)
    if data.pop(section, None) is None:
        return
    try:
        _write_json(path, {"format": LEARNED_FORMAT, **data})
    except OSError as exc:
        log.debug("could not update %s: %s", path, exc)
