"""GPU probe: pinned H2D bandwidth and the attention kernels kvtier's prefill relies on.

Measures, on the lent GPU, what the prefill design assumes: pinned host -> GPU copy speed by size,
and one prefill chunk of 4096 queries against long pasts (Llama-3-8B heads: 32 query, 8 KV, head
dim 128, bf16) through HF's path (bool mask + repeated K/V), SDPA without a mask, and kvtier's
chunk_attention (past without a mask through cuDNN / flash with log-sum-exp, own square causal),
with its K/V as kvtier hands them out (strided views of a token-major buffer). Checks kvtier's
result against HF's path. Prints a table and writes JSON.

  python scripts/probe_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kvtier.hf import attention  # noqa: E402


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of `fn` over `repeats` runs after one warm-up, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def h2d(sizes_mib: list[int]) -> list[dict]:
    rows = []
    for mib in sizes_mib:
        host = torch.empty(mib << 20, dtype=torch.uint8).pin_memory()
        device = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
        seconds = timed(lambda d=device, h=host: d.copy_(h, non_blocking=True))
        rows.append({"mib": mib, "h2d_gbps": (mib << 20) / seconds / 1e9})
    return rows


def attention_row(past: int, chunk: int = 4096) -> dict:
    heads, kv_heads, dim = 32, 8, 128
    scale = dim**-0.5
    gen = torch.Generator(device="cuda").manual_seed(past)
    total = past + chunk
    query = torch.randn(1, heads, chunk, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    # kvtier's layout: [tokens, K/V, batch, kv_heads, head_dim], read as strided [b, h, t, d]
    buffer = torch.randn(
        total, 2, 1, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen
    )
    key = buffer[:, 0].permute(1, 2, 0, 3)
    value = buffer[:, 1].permute(1, 2, 0, 3)
    flops = 4 * chunk * (past + chunk / 2) * heads * dim
    row: dict = {"past": past, "chunk": chunk}

    def hf_path():
        allowed = torch.ones(chunk, total, dtype=torch.bool, device="cuda").tril(past)
        k = key.repeat_interleave(heads // kv_heads, dim=1)
        v = value.repeat_interleave(heads // kv_heads, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(
            query, k, v, attn_mask=allowed, scale=scale
        )

    def maskless():
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, scale=scale, enable_gqa=True
        )

    def kvtier_path():
        return attention.chunk_attention(query, key, value, scale=scale)

    for name, fn in (("hf_mask", hf_path), ("sdpa_no_mask", maskless), ("kvtier", kvtier_path)):
        try:
            seconds = timed(fn, repeats=3)
            row[f"{name}_s"] = seconds
            row[f"{name}_tflops"] = flops / seconds / 1e12
        except Exception as error:  # noqa: BLE001 - report what the kernel said, keep probing
            row[f"{name}_error"] = f"{type(error).__name__}: {error}"[:300]
    try:
        want, got = hf_path().float(), kvtier_path().float()
        row["kvtier_rel_err"] = ((got - want).norm() / want.norm()).item()
    except Exception as error:  # noqa: BLE001
        row["check_error"] = f"{type(error).__name__}: {error}"[:300]
    for kernel in (attention._cudnn, attention._flash):
        folded = query.reshape(1, kv_heads, (heads // kv_heads) * chunk, dim)
        try:
            seconds = timed(
                lambda k=kernel, f=folded: k(f, key[:, :, :past], value[:, :, :past], scale, False),
                repeats=3,
            )
            row[f"{kernel.__name__}_past_tflops"] = 4 * chunk * past * heads * dim / seconds / 1e12
        except Exception as error:  # noqa: BLE001
            row[f"{kernel.__name__}_error"] = f"{type(error).__name__}: {error}"[:300]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--pasts", default="32768,262144,524288")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    info = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "cudnn": torch.backends.cudnn.version(),
    }
    started = time.perf_counter()
    result = {"info": info, "h2d": h2d([1, 16, 64, 256])}
    result["attention"] = [attention_row(int(p)) for p in args.pasts.split(",")]
    result["seconds"] = time.perf_counter() - started
    (args.out / "probe_gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(info))
    for row in result["h2d"]:
        print(f"h2d {row['mib']:>4} MiB: {row['h2d_gbps']:.1f} GB/s")
    for row in result["attention"]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
