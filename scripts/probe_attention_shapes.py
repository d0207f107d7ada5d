"""What a new attention shape costs on this GPU: the first call of each kernel kvtier's chunk
attention can take (cuDNN, flash) on a shape it has not seen, against later calls.

cuDNN builds an execution plan per shape on its first call; a prefill after a reused prefix of
any length, or a prompt of a new length, brings new shapes. Llama-3-8B attention (32 query
heads, 8 KV heads, head_dim 128), bf16. Prints one line per (kernel, shape); writes JSON.

    python scripts/probe_attention_shapes.py --out $OUT/shapes.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvtier.hf import attention


def timed(function, *args) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    function(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", default="3328,4096,3072")
    parser.add_argument("--pasts", default="29440,28672,30464")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    scale = 128**-0.5
    for kernel in ("_cudnn", "_flash"):
        for q_length in [int(x) for x in args.queries.split(",")]:
            for past in [int(x) for x in args.pasts.split(",")]:
                query = torch.randn(1, 8, 4 * q_length, 128, device=device, dtype=torch.bfloat16)
                key = torch.randn(1, 8, past, 128, device=device, dtype=torch.bfloat16)
                value = torch.randn_like(key)
                run = getattr(attention, kernel)
                first = timed(run, query, key, value, scale, False)
                later = min(timed(run, query, key, value, scale, False) for _ in range(3))
                row = {
                    "kernel": kernel,
                    "queries": q_length,
                    "past": past,
                    "first_ms": 1e3 * first,
                    "later_ms": 1e3 * later,
                }
                rows.append(row)
                print(
                    f"{kernel:7} q {q_length:5} past {past:6}: first {1e3 * first:8.1f} ms, "
                    f"later {1e3 * later:6.2f} ms",
                    flush=True,
                )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
