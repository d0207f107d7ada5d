"""What a decode step's attention costs on this GPU, by kernel: 32 layers of one query against L
keys (Llama-3-8B: 32 heads, 8 KV heads, head_dim 128, bf16), L one longer each step as in
generate(); first over key lengths this process has not seen, then over the same lengths again.

cuDNN, which SDPA picks on Hopper, builds an execution plan for each new shape (key length and
strides); flash has no plan. Two layouts: contiguous K/V made anew each step (what
DynamicCache's torch.cat hands attention) and kvtier's strided views of one token-major buffer.
Prints one line per (kernel, layout, pass); writes JSON.

    python scripts/probe_decode_attention.py --context 32768 --steps 16 --out $OUT/decode_attn.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvtier.hf import attention

HEADS, KV_HEADS, DIM, LAYERS = 32, 8, 128, 32


def sdpa(query, key, value):
    return attention.sdpa_decode(query, key, value, scale=None)  # as HF calls it


def sdpa_flash_only(query, key, value):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return sdpa(query, key, value)


def kvtier_decode(query, key, value):
    return attention.decode_attention(query, key, value, scale=None)


KERNELS = {"sdpa": sdpa, "sdpa flash only": sdpa_flash_only, "kvtier decode": kvtier_decode}


def contiguous_kv(length: int, buffer: torch.Tensor):
    """DynamicCache's layout: a new contiguous [1, kv_heads, L, d] tensor each step."""
    key = torch.empty(1, KV_HEADS, length, DIM, device=buffer.device, dtype=buffer.dtype)
    return key, torch.empty_like(key)


def token_major_kv(length: int, buffer: torch.Tensor):
    """kvtier's layout: views of a [tokens, 2, 1, kv_heads, d] buffer (capacity fixed)."""
    view = buffer[:length]
    return view[:, 0].permute(1, 2, 0, 3), view[:, 1].permute(1, 2, 0, 3)


LAYOUTS = {"contiguous": contiguous_kv, "token-major": token_major_kv}


def one_pass(kernel, layout, lengths: list[int], buffer: torch.Tensor) -> dict:
    """Per step: host time to queue 32 layers, and wall time until the GPU finished them."""
    query = torch.randn(1, HEADS, 1, DIM, device=buffer.device, dtype=buffer.dtype)
    host, wall = [], []
    for length in lengths:
        key, value = layout(length, buffer)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(LAYERS):
            kernel(query, key, value)
        queued = time.perf_counter()
        torch.cuda.synchronize()
        host.append(1e3 * (queued - start))
        wall.append(1e3 * (time.perf_counter() - start))
    return {
        "host_ms_median": statistics.median(host),
        "wall_ms_median": statistics.median(wall),
        "wall_ms_mean": statistics.fmean(wall),
        "wall_ms_first": wall[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    capacity = args.context + 64 * (len(KERNELS) * len(LAYOUTS) + 1) + args.steps
    buffer = torch.randn(capacity, 2, 1, KV_HEADS, DIM, device=device, dtype=torch.bfloat16)
    warm = token_major_kv(1024, buffer)  # each kernel's first use, on a length never timed
    for kernel in KERNELS.values():
        kernel(torch.randn(1, HEADS, 1, DIM, device=device, dtype=buffer.dtype), *warm)
    rows = []
    combos = itertools.product(KERNELS.items(), LAYOUTS.items())
    for offset, ((kernel_name, kernel), (layout_name, layout)) in enumerate(combos):
        # lengths no other combination used: a plan another one built cannot help
        first = args.context + 64 * offset
        lengths = list(range(first, first + args.steps))
        for pass_name in ("new lengths", "same lengths again"):
            row = {"kernel": kernel_name, "layout": layout_name, "pass": pass_name}
            row |= one_pass(kernel, layout, lengths, buffer)
            rows.append(row)
            print(
                f"{kernel_name:16} {layout_name:11} {pass_name:18}: step wall "
                f"{row['wall_ms_median']:7.2f} ms median, {row['wall_ms_mean']:7.2f} mean, "
                f"host {row['host_ms_median']:6.2f} ms",
                flush=True,
            )
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "context": args.context,
        "steps": args.steps,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
