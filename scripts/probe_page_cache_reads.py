"""How stored blocks read back from the page cache scale with threads on this host.

Writes `--blocks` raw blocks of the 8B shape (32 layers of 1 MiB: 256 tokens, 8 KV heads,
head_dim 128, bf16) to a temporary store, then reads every one of them back on 1-16 threads,
each thread its own share of the files, best of 3:

  readinto              bare reads, a layer (1 MiB) a call, into that thread's buffers
  readinto+xxh3         the same, each layer hashed after it is read (the format's checksum)
  mmap xxh3 only        each layer hashed in place in the mapped file (no copy: the floor)
  DiskTier.load_block   what a prefix load runs per block (open, header, reads, checks)

Buffers are pinned when CUDA is available, as a prefix load's bounce buffers are. Prints one
line per thread count and writes JSON (`--out`); docs/benchmarks.md has the H200 run.

    python scripts/probe_page_cache_reads.py --out pc.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

from kvtier.layout import KVGeometry
from kvtier.tiers.disk import DiskStore, DiskTier
from kvtier.tiers.disk.areas import StoreLayout

LAYERS = 32
SHAPE = (256, 2, 1, 8, 128)  # one layer of a block: [tokens, K/V, batch, kv_heads, head_dim]
LAYER_BYTES = 1 << 20
THREADS = (1, 2, 4, 8, 12, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=96, help="blocks of 32 MiB (96: 3 GiB)")
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kvtier-pc-probe-"))
    devices = (torch.device("cpu"),) * LAYERS
    geometry = KVGeometry(tuple(range(LAYERS)), devices, 1, 8, 128, torch.bfloat16, 256)
    store = DiskStore(root, budget_bytes=(args.blocks + 4) << 25, codec="raw", fingerprint="f" * 32)
    tier = DiskTier(store, geometry, persist=True, owns_store=True)
    ids = [f"{index:032x}" for index in range(args.blocks)]
    layers = tuple(torch.randn(SHAPE).to(torch.bfloat16) for _ in range(LAYERS))
    for key in ids:  # written, so in the page cache
        tier.save(key, layers, parent_id=None)
    paths = [StoreLayout(root).shared(key) for key in ids]
    pin = torch.cuda.is_available()
    rows = {}
    for threads in THREADS:
        rows[threads] = measure(tier, ids, paths, threads, pin)
        print(threads, rows[threads], flush=True)
    tier.close()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


def measure(tier: DiskTier, ids: list[str], paths: list[Path], threads: int, pin: bool) -> dict:
    """GB/s of each way of reading every block back, on `threads` threads, best of 3."""
    buffers = [
        [torch.empty(SHAPE, dtype=torch.bfloat16, pin_memory=pin) for _ in range(LAYERS)]
        for _ in range(threads)
    ]
    views = [[memoryview(t.view(-1).view(torch.uint8).numpy()) for t in b] for b in buffers]

    def bare(share: int, hashed: bool) -> None:
        for path in paths[share::threads]:
            with open(path, "rb", buffering=0) as file:
                file.seek(path.stat().st_size - LAYERS * LAYER_BYTES)  # the payloads
                for view in views[share]:
                    file.readinto(view)
                    if hashed:
                        xxhash.xxh3_128_hexdigest(view)

    def mapped(share: int) -> None:
        for path in paths[share::threads]:
            with (
                open(path, "rb") as file,
                mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m,
            ):
                whole = memoryview(m)
                start = len(whole) - LAYERS * LAYER_BYTES
                for layer in range(LAYERS):
                    begin = start + layer * LAYER_BYTES
                    xxhash.xxh3_128_hexdigest(whole[begin : begin + LAYER_BYTES])
                del whole

    def loaded(share: int) -> None:
        for key in ids[share::threads]:
            assert tier.load_block(key, buffers[share])

    ways = {
        "readinto": lambda share: bare(share, False),
        "readinto+xxh3": lambda share: bare(share, True),
        "mmap xxh3 only": mapped,
        "DiskTier.load_block": loaded,
    }
    row = {}
    with ThreadPoolExecutor(threads) as pool:
        for name, way in ways.items():
            best = 0.0
            for _ in range(3):
                start = time.perf_counter()
                list(pool.map(way, range(threads)))
                best = max(best, len(ids) * LAYERS * LAYER_BYTES / (time.perf_counter() - start))
            row[name] = round(best / 1e9, 2)
    return row


if __name__ == "__main__":
    main()
