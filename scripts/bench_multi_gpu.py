"""kvtier on a model split over two GPUs (device_map), next to HF's caches on the same split.

Issue 12's measurements, for a 2-GPU machine (pending one: nothing here has run on two GPUs):
  fidelity  fp32 greedy tokens through kvtier equal DynamicCache's at 8K (an 8-layer 8B shape);
            bf16 teacher-forced logits: kvtier's max abs diff to DynamicCache next to
            DynamicCache's own run-to-run spread
  sweep     decode tok/s and peak memory per GPU at 32K and 128K for DynamicCache,
            DynamicCache(offloading=True) and kvtier (25% of the KV on the GPUs), one process,
            interleaved rounds (best of the rounds counts; DESIGN.md 8: HF drifts 2x)
  longest   the longest context kvtier completes (prefill + 2 tokens), doubling from --start
The model is Llama-3-8B-shaped (32 layers) or, with --layers 240, one whose weights and KV need
both GPUs' memory; its layers are split evenly in order, as device_map="auto" does.

  python scripts/bench_multi_gpu.py --out $OUT                      # 2 GPUs
  python scripts/bench_multi_gpu.py --layers 240 --skip fidelity --out $OUT
  python scripts/bench_multi_gpu.py --tiny --device cpu --out /tmp/m   # smoke run, one CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import dispatch_model
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import kvtier  # noqa: E402
from kvtier.hf.models import execution_device  # noqa: E402
from kvtier.layout import KVGeometry, device_staging_bytes  # noqa: E402
from kvtier.planner import split_devices  # noqa: E402


def split_model(args, dtype: torch.dtype, *, layers: int | None = None):
    """benchlib's model, its decoder layers split over the devices with accelerate's hooks."""
    model = benchlib.build_model(
        "cpu" if args.tiny else "meta", dtype, tiny=args.tiny, layers=layers
    )
    count = model.config.num_hidden_layers
    if args.device == "cpu":
        devices = [torch.device("cpu")] * count
    else:
        devices = list(split_devices(count, args.gpus))
    mapping = {"model.embed_tokens": devices[0]}
    mapping |= {f"model.layers.{i}": device for i, device in enumerate(devices)}
    mapping |= {"model.norm": devices[-1], "model.rotary_emb": devices[-1], "lm_head": devices[-1]}
    if not args.tiny:  # built on meta: materialize each part where it lives, random weights
        model = _materialize(model, mapping)
    dispatch_model(model, {k: str(v) for k, v in mapping.items()}, force_hooks=True)
    return model.eval(), devices[0]


def _materialize(model, mapping):
    torch.manual_seed(0)
    for name, device in mapping.items():
        module = model.get_submodule(name)
        module.to_empty(device=device)
        for param_name, param in module.named_parameters():
            with torch.no_grad():
                if param_name.endswith("norm.weight") or name == "model.norm":
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02)
    rotary = type(model.model.rotary_emb)(model.config, device=mapping["model.rotary_emb"])
    model.model.rotary_emb = rotary
    return model


def split_geometry(model, *, block_tokens: int) -> KVGeometry:
    c = model.config
    return KVGeometry(
        layer_ids=tuple(range(c.num_hidden_layers)),
        layer_devices=tuple(execution_device(layer) for layer in model.model.layers),
        batch=1,
        kv_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        dtype=model.dtype,
        block_tokens=block_tokens,
    )


def split_config(model, tokens: int, share: float, store: str, *, chunk: int, disk: int = 0):
    """kvtier budgets per GPU: staging plus `share` of the blocks' slots on every device."""
    kv = split_geometry(model, block_tokens=256)
    slots = max(2, int(share * kv.blocks_for(tokens)))
    staging = device_staging_bytes(kv, tokens, buffers=2)
    devices = {str(d): staging + slots * kv.device_block_bytes(d) for d in kv.devices}
    over = {"gpu": {"devices": devices}, "disk_budget": disk}
    return benchlib.kvtier_config(model, tokens, share, store, chunk=chunk, **over)


def peaks(devices) -> dict[str, float]:
    return {str(d): torch.cuda.max_memory_allocated(d) / benchlib.GiB for d in devices}


def fidelity(args, out: dict) -> None:
    """fp32 tokens identical at 8K; bf16 teacher-forced logits within DynamicCache's spread."""
    context, steps = (256, 4) if args.tiny else (8192, 32)
    store = tempfile.mkdtemp(prefix="kvtier-mg-")
    model, first = split_model(args, torch.float32, layers=None if args.tiny else 8)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=first)
    ref, _ = benchlib.timed_generate(model, ids, DynamicCache(), steps)
    cfg = split_config(model, context + steps, 0.25, store, chunk=args.chunk)
    with kvtier.TieredCache(model, cfg) as cache:
        got, _ = benchlib.timed_generate(model, ids, cache, steps)
        blocks = cache.stats()["gpu"]["blocks"]
    out["fp32"] = {
        "context": context,
        "tokens_identical": torch.equal(ref, got),
        "gpu_blocks": blocks,
    }
    del model, cache
    gc.collect()
    out["bf16"] = teacher_forced(args, context, steps, store)
    print(json.dumps({"fidelity": out}), flush=True)


def teacher_forced(args, context: int, steps: int, store: str) -> dict:
    """One fixed sequence through DynamicCache three times and kvtier once (bf16 logits)."""
    model, first = split_model(args, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, context + steps), device=first)

    def run(cache) -> torch.Tensor:
        logits = []
        with torch.no_grad():  # the prompt in prefill chunks, for both caches
            for start in range(0, context, args.chunk):
                end = min(start + args.chunk, context)
                step = model(ids[:, start:end], past_key_values=cache)
            logits.append(step.logits[0, -1].float())
            for pos in range(context, context + steps - 1):
                step = model(ids[:, pos : pos + 1], past_key_values=cache)
                logits.append(step.logits[0, -1].float())
        return torch.stack(logits).cpu()

    dynamic = [run(DynamicCache()) for _ in range(3)]
    cfg = split_config(model, context + steps, 0.25, store, chunk=args.chunk)
    with kvtier.TieredCache(model, cfg) as cache:
        ours = run(cache)
    spread = [(dynamic[i] - dynamic[j]).abs().max().item() for i, j in ((0, 1), (0, 2), (1, 2))]
    diff = [(ours - d).abs().max().item() for d in dynamic]
    return {"dynamic_spread": spread, "kvtier_vs_dynamic": diff, "within": max(diff) <= max(spread)}


def sweep(args, model, first, out: list) -> None:
    """Every system once per round at each context; interleaved, one process."""
    devices = sorted({execution_device(layer) for layer in model.model.layers}, key=str)
    cuda = first.type == "cuda"
    names = ["DynamicCache", *(["HF offloaded"] if cuda else []), "kvtier 25%"]
    store = tempfile.mkdtemp(prefix="kvtier-mg-")
    for context in args.contexts:
        torch.manual_seed(context)
        ids = torch.randint(0, model.config.vocab_size, (1, context), device=first)
        for round_index in range(args.rounds):
            for name in names:
                if name == "DynamicCache":
                    cache = DynamicCache()
                elif name == "HF offloaded":
                    cache = DynamicCache(offloading=True)
                else:
                    tokens = context + args.new_tokens
                    cache = kvtier.TieredCache(
                        model, split_config(model, tokens, 0.25, store, chunk=args.chunk)
                    )
                row = {"context": context, "round": round_index, "system": name}
                if cuda:
                    for device in devices:
                        torch.cuda.reset_peak_memory_stats(device)
                try:
                    _, result = benchlib.timed_generate(
                        model, ids, cache, args.new_tokens, prefill_chunk_size=args.chunk
                    )
                    row |= {k: result[k] for k in ("ttft_s", "step_ms", "total_s")}
                    row["tok_s"] = 1e3 / result["step_ms"] if result["step_ms"] else None
                    row["peak_gib"] = peaks(devices) if cuda else {}
                except (RuntimeError, kvtier.KVTierError) as error:  # OOM is a RuntimeError
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                finally:
                    if isinstance(cache, kvtier.TieredCache):
                        cache.close()
                    del cache
                    gc.collect()
                    if cuda:
                        torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                out.append(row)


def longest(args, model, first, out: dict) -> None:
    """Double the context from --start until kvtier fails or passes --limit-s for one run."""
    store = tempfile.mkdtemp(prefix="kvtier-mg-")
    context, done = args.start, 0
    while context <= args.max_context:
        ids = torch.randint(0, model.config.vocab_size, (1, context), device=first)
        cfg = split_config(model, context + 2, 0.25, store, chunk=args.chunk, disk=args.disk_budget)
        start = time.perf_counter()
        try:
            with kvtier.TieredCache(model, cfg) as cache:
                benchlib.timed_generate(model, ids, cache, 2)
        except (kvtier.KVTierError, torch.cuda.OutOfMemoryError) as error:
            out["stopped"] = f"{context}: {type(error).__name__}: {str(error).splitlines()[0]}"
            break
        seconds = time.perf_counter() - start
        done = context
        print(json.dumps({"longest": context, "seconds": seconds}), flush=True)
        if seconds > args.limit_s:
            out["stopped"] = f"{context} took {seconds:.0f} s (over --limit-s)"
            break
        context *= 2
    out["longest_tokens"] = done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--start", type=int, default=131072, help="longest: first context")
    p.add_argument("--max-context", type=int, default=1 << 21)
    p.add_argument(
        "--limit-s", type=float, default=600.0, help="longest: stop after a run this long"
    )
    p.add_argument("--disk-budget", type=int, default=0, help="longest: disk tier bytes")
    p.add_argument("--skip", default="", help="comma list of: fidelity,sweep,longest")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    if args.tiny:
        args.contexts = args.contexts or [256]
        args.start, args.max_context, args.chunk = 256, min(args.max_context, 512), 128
        args.rounds, args.new_tokens = min(args.rounds, 1), min(args.new_tokens, 4)
    args.contexts = args.contexts or [32768, 131072]
    if args.device != "cpu" and torch.cuda.device_count() < args.gpus:
        p.error(f"--gpus {args.gpus} but this machine has {torch.cuda.device_count()} CUDA devices")
    skip = set(filter(None, args.skip.split(",")))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"args": vars(args), "fidelity": {}, "sweep": [], "longest": {}}
    if "fidelity" not in skip:
        fidelity(args, result["fidelity"])
    if not skip >= {"sweep", "longest"}:
        model, first = split_model(args, torch.bfloat16, layers=args.layers)
        if "sweep" not in skip:
            sweep(args, model, first, result["sweep"])
        if "longest" not in skip:
            longest(args, model, first, result["longest"])
    (out_dir / "multi_gpu.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {out_dir / 'multi_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
