"""hashlib's digests on this host, on 1, 4 and 8 threads: which one could sign remote blocks
fastest (they release the GIL on large buffers, so threads add up).

For 128 KiB and 1 MiB buffers (64 random ones, each hashed 4 times a pass, best of 3): MiB/s of
sha256 (what signed values use), sha512_256, sha512, sha384, sha3_256, blake2b and sha1. Prints
the CPU model, whether it has SHA-NI and AVX-512, and OpenSSL's version; writes JSON
(`--out`). docs/remote.md has the H200 host's run.

    python scripts/probe_hashes.py --out hashes.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DIGESTS = ("sha256", "sha512_256", "sha512", "sha384", "sha3_256", "blake2b", "sha1")
SIZES = (128 << 10, 1 << 20)
THREADS = (1, 4, 8)


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?"
    )
    flags = next((line for line in lines if line.startswith("flags")), "").split()
    return (
        f"{model} | sha_ni: {'sha_ni' in flags} avx512f: {'avx512f' in flags} | "
        f"{ssl.OPENSSL_VERSION} | cpus {os.cpu_count()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="JSON results file")
    args = parser.parse_args()
    print(cpu_line())
    results = {}
    for size in SIZES:
        buffers = [os.urandom(size) for _ in range(64)]
        for name in DIGESTS:
            for threads in THREADS:

                def work(chunk: list[bytes], name: str = name) -> None:
                    for buffer in chunk:
                        hashlib.new(name, buffer).digest()

                shares = [buffers[i::threads] * 4 for i in range(threads)]
                best = 0.0
                with ThreadPoolExecutor(threads) as pool:
                    for _ in range(3):
                        start = time.perf_counter()
                        list(pool.map(work, shares))
                        best = max(best, 4 * 64 * size / (time.perf_counter() - start) / 2**20)
                results[f"{name} {size >> 10}KiB x{threads}"] = round(best)
                print(f"{name:10s} {size >> 10:5d} KiB x{threads}: {best:8.0f} MiB/s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
