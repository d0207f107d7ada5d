"""Decode speed, peak GPU memory and fidelity of kvtier next to HF's own caches.

Runs everything in one process after a warm-up run of each cache (HF's first run at a new
context length is 2-3x slower than the second). Writes JSON and a markdown table.

  python scripts/bench_decode.py --out results/        # GPU: Llama-3-8B shape, 8K and 32K
  python scripts/bench_decode.py --tiny --out /tmp/b   # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, LogitsProcessor

import kvtier

GiB = 1 << 30


class StepClock(LogitsProcessor):
    """Timestamps every decode step (generate syncs each step anyway to test stopping)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def build_model(args, dtype: torch.dtype, layers: int | None = None) -> LlamaForCausalLM:
    if args.tiny:
        cfg = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=layers or 4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=65536,
            initializer_range=0.2,
        )
    else:  # Llama-3-8B shape
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=layers or 32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=262144,
            rope_theta=500000.0,
        )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * itemsize


def kvtier_config(args, model, context: int, resident: float, store: str):
    """Budgets so that `resident` of the KV stays on the GPU and the rest streams from host."""
    bt = args.block_tokens
    per_token = kv_bytes_per_token(model)
    layers = model.config.num_hidden_layers
    total_tokens = context + args.new_tokens
    blocks = -(-total_tokens // bt)
    staging = 2 * blocks * bt * per_token // layers  # prefetch_depth 1 -> two staging buffers
    chunk_blocks = -(-args.chunk // bt) + 1
    gpu = staging + max(int(resident * blocks), chunk_blocks + 2) * bt * per_token
    return kvtier.load_config(
        None,
        block_tokens=bt,
        prefill_chunk_tokens=args.chunk,
        gpu_budget=gpu,
        host_budget=(blocks + 8) * bt * per_token,
        disk_path=store,
        disk_budget=0,
        policy_name="sink_recent",
        policy_sink_tokens=bt,
        policy_recent_tokens=bt,
        policy_prefetch_depth=1,
    )


def run_generate(model, ids, cache, new_tokens: int, chunk: int):
    clock = StepClock(ids.device)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=[clock],
            prefill_chunk_size=chunk,
            pad_token_id=0,
        )
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    peak = torch.cuda.max_memory_allocated() / GiB if ids.device.type == "cuda" else 0.0
    return out, {
        "ttft_s": clock.times[0] - start,
        "decode_ms_median": 1e3 * statistics.median(steps),
        "decode_tok_s": 1.0 / statistics.median(steps),
        "total_s": total,
        "peak_gib": peak,
    }


def bench(args, out_dir: Path) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GiB
    rows = []
    store = tempfile.mkdtemp(prefix="kvtier-bench-")
    for context in args.contexts:
        torch.manual_seed(context)
        ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
        kinds = [("DynamicCache", None)]
        if device.type == "cuda":  # HF's offloaded cache needs CUDA streams
            kinds.append(("DynamicCache(offloading=True)", None))
        kinds += [(f"kvtier {int(r * 100)}% resident", r) for r in args.resident]
        reference = None
        for name, resident in kinds:
            result = None
            for _attempt in ("warm-up", "measured"):
                if resident is None:
                    cache = DynamicCache(offloading="offloading" in name)
                else:
                    cache = kvtier.TieredCache(
                        model, kvtier_config(args, model, context, resident, store)
                    )
                out, result = run_generate(model, ids, cache, args.new_tokens, args.chunk)
                if resident is not None:
                    stats = cache.stats()
                    result["gpu_blocks"] = stats["gpu"]["blocks"]
                    result["blocks"] = stats["blocks"]
                    result["streamed_bytes_per_step"] = (
                        stats["blocks"] - stats["gpu"]["blocks"]
                    ) * stats["block_bytes"]
                    result["floor_ms"] = 1e3 * result["streamed_bytes_per_step"] / 55e9
                    result["kv_gpu_gib"] = stats["gpu"]["reserved_bytes"] / GiB  # slabs + staging
                    cache.close()
                del cache
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            tokens = out[0, context:].tolist()
            if reference is None:
                reference = tokens
            result.update(
                context=context,
                cache=name,
                weights_gib=weights_gib,
                tokens_match_dynamic=tokens == reference,
                first_divergence=next(
                    (i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b),
                    None,
                ),
            )
            rows.append(result)
            print(json.dumps(result), flush=True)
            (out_dir / "bench.json").write_text(json.dumps(rows, indent=1))
    return rows


def teacher_forced(args, out_dir: Path) -> dict:
    """Fidelity (a): one fixed token sequence through DynamicCache twice and kvtier once."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, dtype)
    context = args.fidelity_context
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, context + args.new_tokens), device=device)
    store = tempfile.mkdtemp(prefix="kvtier-tf-")

    def run(cache):
        logits = []
        with torch.no_grad():
            for start in range(0, context, args.chunk):
                out = model(ids[:, start : min(start + args.chunk, context)], past_key_values=cache)
            logits.append(out.logits[0, -1].float())
            for pos in range(context, context + args.new_tokens - 1):
                out = model(ids[:, pos : pos + 1], past_key_values=cache)
                logits.append(out.logits[0, -1].float())
        return torch.stack(logits)

    dynamic = [run(DynamicCache()) for _ in range(3)]
    cache = kvtier.TieredCache(model, kvtier_config(args, model, context, 0.25, store))
    kv = run(cache)
    stats = cache.stats()
    cache.close()

    def spread(a: torch.Tensor, b: torch.Tensor) -> dict:
        diff = (a - b).abs()
        return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item()}

    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    dyn = [spread(dynamic[i], dynamic[j]) for i, j in pairs]
    ours = [spread(kv, d) for d in dynamic]
    result = {
        "context": context,
        "steps": args.new_tokens,
        "dtype": str(dtype),
        "dynamic_vs_dynamic": dyn,
        "kvtier_vs_dynamic": ours,
        "kvtier_gpu_blocks": stats["gpu"]["blocks"],
        "kvtier_blocks": stats["blocks"],
    }
    # kvtier is as close to DynamicCache as DynamicCache is to itself, on average over runs
    mean_dyn = sum(d["max_abs"] for d in dyn) / len(dyn)
    mean_ours = sum(d["max_abs"] for d in ours) / len(ours)
    result["mean_max_abs_dynamic_vs_dynamic"] = mean_dyn
    result["mean_max_abs_kvtier_vs_dynamic"] = mean_ours
    result["pass"] = mean_ours <= mean_dyn
    print(json.dumps(result), flush=True)
    (out_dir / "teacher_forced.json").write_text(json.dumps(result, indent=1))
    return result


def deterministic_fp32(args, out_dir: Path) -> dict:
    """Fidelity (b): greedy tokens identical in fp32 with deterministic algorithms."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    device = torch.device(args.device)
    model = build_model(args, torch.float32, layers=args.fp32_layers)
    context = args.fidelity_context
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    store = tempfile.mkdtemp(prefix="kvtier-fp32-")
    ref, _ = run_generate(model, ids, DynamicCache(), args.new_tokens, args.chunk)
    cache = kvtier.TieredCache(model, kvtier_config(args, model, context, 0.25, store))
    got, _ = run_generate(model, ids, cache, args.new_tokens, args.chunk)
    stats = cache.stats()
    cache.close()
    torch.use_deterministic_algorithms(False)
    result = {
        "context": context,
        "layers": model.config.num_hidden_layers,
        "new_tokens": args.new_tokens,
        "tokens_identical": torch.equal(ref, got),
        "kvtier_gpu_blocks": stats["gpu"]["blocks"],
        "kvtier_blocks": stats["blocks"],
    }
    print(json.dumps(result), flush=True)
    (out_dir / "deterministic_fp32.json").write_text(json.dumps(result, indent=1))
    return result


def profile_decode(args, out_dir: Path) -> None:
    """cProfile of one kvtier generate (host time per function), for finding per-layer overhead."""
    import cProfile
    import io
    import pstats

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args, dtype)
    context = args.contexts[-1]
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    store = tempfile.mkdtemp(prefix="kvtier-prof-")
    for attempt in range(2):
        cache = kvtier.TieredCache(model, kvtier_config(args, model, context, 0.25, store))
        profiler = cProfile.Profile()
        if attempt:
            profiler.enable()
        run_generate(model, ids, cache, args.new_tokens, args.chunk)
        profiler.disable()
        cache.close()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    (out_dir / "profile.txt").write_text(text.getvalue())


def markdown(rows: list[dict]) -> str:
    lines = [
        "| context | cache | decode ms/step | tok/s | TTFT s | peak GiB | GPU-resident blocks | "
        "streaming floor ms | tokens = DynamicCache |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        resident = f"{r['gpu_blocks']}/{r['blocks']}" if "blocks" in r else "all"
        floor = f"{r['floor_ms']:.1f}" if "floor_ms" in r else ""
        lines.append(
            f"| {r['context']} | {r['cache']} | {r['decode_ms_median']:.1f} | "
            f"{r['decode_tok_s']:.1f} | {r['ttft_s']:.2f} | {r['peak_gib']:.2f} | {resident} | "
            f"{floor} | {'yes' if r['tokens_match_dynamic'] else 'no @' + str(r['first_divergence'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    p.add_argument(
        "--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 32768]
    )
    p.add_argument(
        "--resident", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.25, 0.0]
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--block-tokens", type=int, default=256)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--fidelity-context", type=int, default=8192)
    p.add_argument("--fp32-layers", type=int, default=8)
    p.add_argument("--skip", default="", help="comma list of: bench,teacher,fp32,profile")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    if "teacher" not in skip:
        teacher_forced(args, out_dir)
    if "fp32" not in skip:
        deterministic_fp32(args, out_dir)
    if "bench" not in skip:
        rows = bench(args, out_dir)
        table = markdown(rows)
        (out_dir / "bench.md").write_text(table + "\n")
        print(table)
    if "profile" not in skip:
        profile_decode(args, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
