"""Measure this machine for kvtier: the store's disk, the codecs on KV-like data, copies by size,
and the remote tier's server when one is configured.

Returns plain JSON-ready results (the bench file format measured.py reads); it never prints
and never saves (the CLI calls measured.write_bench). Files go in a temporary folder inside the
store path, removed afterwards; remote values go under a scratch fingerprint, deleted afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier._version import __version__
from kvtier.errors import KVTierError, RemoteError
from kvtier.layout import CPU, KVGeometry
from kvtier.machine import default_io_threads, nearest_existing
from kvtier.measured import BENCH_FORMAT, file_system_id, remote_nodes
from kvtier.tiers.codec import choose_codec, measure_codec
from kvtier.tiers.disk.files import write_atomic

if TYPE_CHECKING:
    from kvtier.tiers.remote.url import RemoteSpec

COPY_SIZES = (64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
CODEC_SAMPLE_BYTES = 16 << 20
_MIN_FILES = 4
# The remote bench's blocks: 16 layers of 64 tokens x 8 KV heads x 128 bf16 channels, 4 MiB a
# block (a Llama-3-8B-like layer shape), stored under a fingerprint no model has.
REMOTE_GEOMETRY = KVGeometry(tuple(range(16)), (CPU,) * 16, 1, 8, 128, torch.bfloat16, 64)
REMOTE_FINGERPRINT = "kvtier-bench"
REMOTE_TTL_S = 600  # the scratch values expire even if deleting them fails
REMOTE_LOAD_REPEATS = 3

Progress = Callable[[str], None]  # called with each part's name once it is measured


def run_bench(
    store: str | os.PathLike[str],
    *,
    disk_bytes: int = 256 << 20,
    copy_sizes: tuple[int, ...] = COPY_SIZES,
    remote: RemoteSpec | None = None,
    remote_bytes: int = 64 << 20,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Every measurement, as the bench file holds it: disk (one entry, for `store`'s file
    system), codec (ratio and GB/s per codec, and what `auto` would pick for this disk),
    copies (GB/s per kind and size) and, with a `remote` server, remote (one entry: its save
    and load GB/s, or an error when it could not be measured)."""
    done = progress or (lambda what: None)
    disk = measure_disk(Path(store).expanduser(), total_bytes=disk_bytes)
    done("disk")
    codec = measure_codecs(disk["write_gbps"], disk["read_gbps"])
    done("codecs")
    copies = measure_copies(copy_sizes)
    done("copies")
    servers = []
    if remote is not None:
        servers.append(measure_remote(remote, total_bytes=remote_bytes))
        done("remote")
    return {
        "format": BENCH_FORMAT,
        "measured_at": _now(),
        "kvtier": __version__,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "disk": [disk],
        "codec": codec,
        "copies": copies,
        **({"remote": servers} if remote is not None else {}),
    }


def measure_disk(store: Path, *, total_bytes: int) -> dict[str, Any]:
    """Write+fsync (the store's atomic write) then read back files totalling `total_bytes` in a
    temporary folder inside `store`: the read after dropping each file's cached pages
    (posix_fadvise, best effort) and again from the page cache. GB/s are 1e9 bytes per second."""
    if total_bytes < _MIN_FILES << 20:
        raise KVTierError(f"bench size {total_bytes} bytes is too small; use at least 4MiB")
    file_bytes = min(32 << 20, total_bytes // _MIN_FILES)
    files = total_bytes // file_bytes
    payload = np.random.default_rng(0).integers(0, 256, file_bytes, dtype=np.uint8)
    folder, made = _scratch(store)
    try:
        paths = [folder / f"block-{index}.bin" for index in range(files)]
        start = time.perf_counter()
        for path in paths:
            write_atomic(path, [memoryview(payload)], temp_name=f".{path.name}.tmp")
        write_s = time.perf_counter() - start
        buffer = bytearray(file_bytes)
        read_s = _read_all(paths, buffer, drop_cache=True)
        cached_s = _read_all(paths, buffer, drop_cache=False)
        threads = min(files, default_io_threads())
        parallel_s = _read_parallel(paths, file_bytes, threads=threads)
    finally:
        shutil.rmtree(made, ignore_errors=True)
    moved = files * file_bytes
    return {
        "path": str(store),
        "device": file_system_id(store),
        "files": files,
        "file_bytes": file_bytes,
        "write_gbps": moved / write_s / 1e9,
        "read_gbps": moved / read_s / 1e9,
        "cached_read_gbps": moved / cached_s / 1e9,
        # as a prefix load reads: one file per I/O thread at once, cold
        "parallel_read_gbps": moved / parallel_s / 1e9,
        "read_threads": threads,
        "measured_at": _now(),
    }


def measure_remote(spec: RemoteSpec, *, total_bytes: int) -> dict[str, Any]:
    """Save blocks of REMOTE_GEOMETRY totalling about `total_bytes` (one at least) to the
    server one at a time, as write-through does, then load them back in one `load_blocks` call
    (best of REMOTE_LOAD_REPEATS), block checks included; then delete them. GB/s count the raw
    KV bytes (as the tier's own load_gbps). A server that cannot be used gives an entry with
    `error` (one line, no password) instead of speeds: never an exception."""
    from kvtier.tiers.remote.client import RemoteClient
    from kvtier.tiers.remote.tier import RemoteTier
    from kvtier.tiers.remote.values import block_key

    entry: dict[str, Any] = {"url": spec.redacted(), "nodes": remote_nodes(spec)}
    geometry = REMOTE_GEOMETRY
    blocks = max(1, total_bytes // geometry.block_bytes)
    scratch = dataclasses.replace(spec, ttl_s=REMOTE_TTL_S)
    try:
        client = RemoteClient.connect(scratch)
    except RemoteError as error:
        return {**entry, "error": str(error), "measured_at": _now()}
    tier = RemoteTier(scratch, geometry, fingerprint=REMOTE_FINGERPRINT, client=client)
    keys = [f"{index:032x}" for index in range(blocks)]
    try:
        generator = torch.Generator().manual_seed(0)
        shape = (geometry.block_tokens, *geometry.token_shape)
        layers = tuple(
            torch.randn(shape, generator=generator).to(geometry.dtype) for _ in geometry.layer_ids
        )
        start = time.perf_counter()
        for key in keys:
            if not tier.save(key, layers, parent_id=None):
                return {**entry, "error": "the server did not store a block", "measured_at": _now()}
        save_s = time.perf_counter() - start
        targets = [[torch.empty_like(t) for t in layers] for _ in keys]
        load_s = float("inf")
        for _ in range(REMOTE_LOAD_REPEATS):
            start = time.perf_counter()
            results = tier.load_blocks(keys, targets)
            load_s = min(load_s, time.perf_counter() - start)
            if not all(results):
                found = sum(1 for result in results if result)
                problem = f"only {found} of {blocks} saved blocks loaded back"
                return {**entry, "error": problem, "measured_at": _now()}
    finally:
        client.delete_many([block_key(REMOTE_FINGERPRINT, key) for key in keys])
        tier.close()
    moved = blocks * geometry.block_bytes
    return {
        **entry,
        "blocks": blocks,
        "block_bytes": geometry.block_bytes,
        "save_gbps": moved / max(save_s, 1e-9) / 1e9,
        "load_gbps": moved / max(load_s, 1e-9) / 1e9,
        "measured_at": _now(),
    }


def _scratch(store: Path) -> tuple[Path, Path]:
    """A new folder inside `store` for the bench files, and the topmost folder this made (to
    remove afterwards: the store itself if it did not exist yet)."""
    existing = nearest_existing(store)
    made = store if existing != store.absolute() else None
    folder = store / f".kvtier-bench-{secrets.token_hex(4)}"
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise KVTierError(
            f"cannot write at the store path {store} ({exc.strerror or exc}); point disk.path "
            "at a writable directory (--set disk.path=DIR)"
        ) from None
    if made is not None:  # the first folder below what existed: everything this call created
        made = existing / store.absolute().relative_to(existing).parts[0]
    return folder, made or folder


def _read_all(paths: list[Path], buffer: bytearray, *, drop_cache: bool) -> float:
    """Seconds to read every file whole into `buffer`; first dropping their cached pages."""
    if drop_cache:
        _drop_cache(paths)
    start = time.perf_counter()
    for path in paths:
        _read_one(path, buffer)
    return max(time.perf_counter() - start, 1e-9)


def _drop_cache(paths: list[Path]) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:  # the files were fsynced: their pages are clean and can go
        with path.open("rb", buffering=0) as file:
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _read_one(path: Path, buffer: bytearray) -> None:
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as file:
        done = 0
        while done < len(buffer):
            got = file.readinto(view[done:])
            if not got:
                raise KVTierError(f"bench file {path} came back short; is the disk full?")
            done += got


def _read_parallel(paths: list[Path], file_bytes: int, *, threads: int) -> float:
    """Seconds to read every file (cached pages dropped first) with `threads` at once, each
    into a buffer of its own: how the mover's I/O threads read a stored prefix."""
    _drop_cache(paths)
    buffers = [bytearray(file_bytes) for _ in range(threads)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(
            pool.map(lambda item: _read_one(item[1], buffers[item[0] % threads]), enumerate(paths))
        )
    return max(time.perf_counter() - start, 1e-9)


def kv_like_sample(num_bytes: int = CODEC_SAMPLE_BYTES) -> torch.Tensor:
    """bf16 values shaped like K/V: per channel, a normal times a log-normal scale (channels of
    one head differ by orders of magnitude in real K). Seeded, so runs compare."""
    generator = torch.Generator().manual_seed(0)
    channels = 128
    rows = max(1, num_bytes // 2 // channels)
    scale = torch.exp(torch.randn(channels, generator=generator))
    values = torch.randn(rows, channels, generator=generator) * scale
    return values.to(torch.bfloat16).reshape(-1)  # [rows * channels]


def measure_codecs(disk_write_gbps: float, disk_read_gbps: float) -> dict[str, Any]:
    """Ratio and one-thread GB/s of each codec on kv_like_sample(), and the codec `auto` picks
    for a disk of these speeds (the same rule the store applies)."""
    sample = kv_like_sample()
    numbers = measure_codec(sample)
    chosen = choose_codec(sample, disk_write_gbps=disk_write_gbps, disk_read_gbps=disk_read_gbps)
    return {
        "sample": "bf16, normal x log-normal channel scales",
        "sample_bytes": sample.nbytes,
        **numbers,
        "auto_choice": chosen.value,
    }


def measure_copies(sizes: tuple[int, ...], *, repeats: int = 5) -> list[dict[str, Any]]:
    """GB/s per copy size: pinned and pageable H2D and pinned D2H with CUDA; memory copies
    (what the GPU tier's copies are on a CPU-only machine) always, through torch's copy_ with
    its intra-op threads, as the mover makes them."""
    rows = []
    for size in sizes:
        source, target = torch.empty(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        seconds = _best(lambda source=source, target=target: target.copy_(source), repeats)
        rows.append({"kind": "host_memcpy", "bytes": size, "gbps": size / seconds / 1e9})
    if torch.cuda.is_available():
        rows += _cuda_copies(sizes, repeats)
    return rows


def _cuda_copies(sizes: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        device = torch.empty(size, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(size, dtype=torch.uint8)
        for kind, source, target in (
            ("pinned_h2d", pinned, device),
            ("pageable_h2d", pageable, device),
            ("pinned_d2h", device, pinned),
        ):
            seconds = _cuda_best(source, target, repeats)
            rows.append({"kind": kind, "bytes": size, "gbps": size / seconds / 1e9})
    return rows


def _cuda_best(source: torch.Tensor, target: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    target.copy_(source, non_blocking=True)  # warm-up
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        target.copy_(source, non_blocking=True)
        end.record()
        end.synchronize()  # a benchmark: the one place kvtier waits on the device itself
        best = min(best, begin.elapsed_time(end) / 1e3)
    return max(best, 1e-9)


def _best(action: Callable[[], object], repeats: int) -> float:
    action()  # warm-up: first touch of the pages
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")
