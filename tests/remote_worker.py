"""One process of a fleet sharing blocks through a remote tier (tests/test_remote_fleet.py).

`python tests/remote_worker.py JOB` with JOB a JSON object: {"url", "role": "write" | "read",
"blocks", "rounds", "seed"}. A writer computes (here: derives from the seed) a chain of blocks and
saves them; a reader asks stored_prefix, loads what is there `rounds` times and reports, per
round, each block's sha256 or null for a miss. One JSON line on stdout; no pickle.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time

import torch

from kvtier.blocks import block_id
from kvtier.layout import CPU, KVGeometry
from kvtier.tiers.remote.tier import RemoteTier
from kvtier.tiers.remote.url import parse_remote

FINGERPRINT = "fleet" + "0" * 27
GEOMETRY = KVGeometry((0, 1, 2, 3), (CPU,) * 4, 1, 2, 32, torch.bfloat16, 64)


def chain(seed: int, count: int) -> list[str]:
    ids, parent = [], None
    for index in range(count):
        parent = block_id(parent, range(index * 64, index * 64 + 64), FINGERPRINT + str(seed))
        ids.append(parent)
    return ids


def layers_of(key: str) -> tuple[torch.Tensor, ...]:
    """The one content a block id stands for, in every process."""
    generator = torch.Generator().manual_seed(int(key[:12], 16))
    shape = (GEOMETRY.block_tokens, *GEOMETRY.token_shape)
    return tuple(torch.randn(shape, generator=generator).to(torch.bfloat16) for _ in range(4))


def digest(layers: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for tensor in layers:
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(job: dict) -> dict:
    spec = parse_remote({"url": job["url"], "timeout_ms": job.get("timeout_ms", 300)})
    tier = RemoteTier(spec, GEOMETRY, fingerprint=FINGERPRINT)
    ids = chain(job["seed"], job["blocks"])
    if job["role"] == "write":
        saved = [tier.save(key, layers_of(key), parent_id=None) for key in ids]
        tier.close()
        return {
            "saved": sum(1 for size in saved if size),
            "digests": [digest(layers_of(k)) for k in ids],
        }
    rounds = []
    for _ in range(job["rounds"]):
        started = time.monotonic()
        prefix = tier.stored_prefix(ids)
        outs = [[torch.empty_like(t) for t in layers_of(ids[0])] for _ in ids]
        results = tier.load_blocks(ids, outs)
        found = [digest(o) if r else None for r, o in zip(results, outs, strict=True)]
        rounds.append({"prefix": prefix, "digests": found, "s": time.monotonic() - started})
        time.sleep(job.get("pause_s", 0))
    tier.close()
    return {"rounds": rounds}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
