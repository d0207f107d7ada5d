"""The longest context kvtier completes on one GPU: prefill plus a few new tokens, timed.

Llama-3-8B shape, bf16, random weights; the GPU budget (default 8 GiB) holds staging and a few
blocks, pinned host RAM the rest (the disk tier takes what RAM cannot). `--gpu-cap-gib 80`
caps this process at 80 GiB of GPU memory, so a larger card stands in for an 80 GB H100.
Writes long.json: seconds per phase, peak GPU memory, host->GPU bytes of the prefill.

  python scripts/bench_long.py --context 786432 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import kvtier  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=786432)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--gpu-budget", default="8GiB")
    p.add_argument("--host-budget", default="110GiB")
    p.add_argument("--disk-budget", default="0")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--gpu-cap-gib", type=float, default=80.0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and args.gpu_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory / benchlib.GiB
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_cap_gib / total))
    started = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = benchlib.build_model(args.device, dtype, tiny=args.tiny)
    weights = sum(t.numel() * t.element_size() for t in model.parameters()) / benchlib.GiB
    built = time.perf_counter()
    torch.manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=device)
    cfg = kvtier.load_config(
        None,
        block_tokens=256,
        prefill_chunk_tokens=args.chunk,
        gpu_budget=args.gpu_budget,
        host_budget=args.host_budget,
        disk_budget=args.disk_budget,
        disk_path=tempfile.mkdtemp(prefix="kvtier-long-"),
        policy_name="sink_recent",
        policy_sink_tokens=256,
        policy_recent_tokens=256,
    )
    result: dict = {"context": args.context, "new_tokens": args.new_tokens, "weights_gib": weights}
    with kvtier.TieredCache(model, cfg) as cache:
        out, timing = benchlib.timed_generate(model, ids, cache, args.new_tokens)
        stats = timing.pop("stats")
    kv_bytes = stats["blocks"] * stats["block_bytes"]
    result |= {
        "completed": out.shape[1] == args.context + args.new_tokens,
        "build_s": built - started,
        "ttft_s": timing["ttft_s"],
        "decode_step_ms": timing["step_ms"],
        "total_s": time.perf_counter() - started,
        "peak_gib": timing["peak_gib"],
        "peak_over_weights_gib": timing["peak_gib"] - weights,
        "gpu_budget_bytes": cfg.gpu.budget_bytes,
        "kv_bytes": kv_bytes,
        "prefill_h2d_bytes": timing["prefill_h2d_bytes"],
        "prefill_h2d_bytes_over_kv_bytes": timing["prefill_h2d_bytes"] / kv_bytes,
        "tiers": {
            t: {k: stats[t][k] for k in ("blocks", "bytes_used")} for t in ("gpu", "host", "disk")
        },
        "gpu_cap_gib": args.gpu_cap_gib,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
    }
    # prefill FLOPs (QK and PV of causal attention, plus the linear layers) per second
    c = model.config
    attention = 2 * args.context**2 * c.hidden_size * c.num_hidden_layers
    linear = 2 * sum(p.numel() for p in model.parameters()) * args.context
    result["prefill_tflops"] = (attention + linear) / timing["ttft_s"] / 1e12
    print(json.dumps(result, indent=1), flush=True)
    (out_dir / "long.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
