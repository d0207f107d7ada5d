"""Decode speed, time to first token and peak GPU memory of kvtier next to HF's own caches.

One process, interleaved rounds (every system once per round, best of the rounds): the lent
GPU's HF decode speed drifts up to 2x between rounds, so only ratios within one run count.
Systems: DynamicCache (HF's default one-shot prefill), DynamicCache with prefill_chunk_size
(at 128K+, where it needs chunks to survive), DynamicCache(offloading=True), and kvtier with
all of the KV fitting its GPU budget, 25% of it, and the smallest budget that streams it.
Also the fidelity checks (bf16 teacher-forced logits, fp32 deterministic tokens) and a
torch.profiler summary of kvtier's all-fit decode. Writes sweep.json and prints a table.

  python scripts/bench_decode.py --out $OUT                      # GPU: Llama-3-8B shape
  python scripts/bench_decode.py --tiny --device cpu --out /tmp/b --contexts 512 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import kvtier  # noqa: E402
from kvtier.hf import attention  # noqa: E402
from kvtier.transfer import Mover  # noqa: E402

SHARES = {"kvtier 100%": 1.0, "kvtier 25%": 0.25, "kvtier min": "min"}
# kvtier all-fit as before departure 22: decode attention through SDPA (cuDNN on Hopper), and
# every prefill chunk on cuDNN first whether its plan pays or not
SDPA_DECODE = "kvtier 100% sdpa-decode"
CUDNN_PREFILL = "kvtier 100% cudnn-prefill"
# kvtier 25% as before departure 23: a gather's copies of GPU-resident blocks in series with its
# host-to-GPU copies, on one copy stream
SERIAL_D2D = "kvtier 25% serial-d2d"
SWITCHES = {  # system -> (object, its attribute, what replaces it for that run)
    SDPA_DECODE: (attention, "decode_attention", attention.sdpa_decode),
    CUDNN_PREFILL: (
        attention,
        "_kernel_order",
        lambda *args: (attention._cudnn, attention._flash),
    ),
    SERIAL_D2D: (Mover, "SPLIT_DEVICE_COPIES", False),
}
# system -> (share of SHARES, prefetch depth; None: --prefetch-depth)
DEPTHS = {"kvtier 25% depth 2": ("kvtier 25%", 2), SERIAL_D2D: ("kvtier 25%", None)}
# the controls of one change: run only when asked, not plotted
A_B = tuple(dict.fromkeys((*SWITCHES, *DEPTHS)))


def systems(context: int, device: torch.device, chunk_from: int) -> list[str]:
    names = ["DynamicCache"]
    if context >= chunk_from:
        names.append("DynamicCache chunked")
    if device.type == "cuda":
        names.append("HF offloaded")
    return names + list(SHARES)


@contextlib.contextmanager
def switched(name: str):
    """A benchmark-only switch of kvtier's attention for the systems that compare with it."""
    if name not in SWITCHES:
        yield
        return
    owner, attribute, replacement = SWITCHES[name]
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


def run_one(args, model, ids, name: str, store: str) -> dict:
    new_tokens = args.new_tokens
    chunked = None
    if name == "DynamicCache":
        cache = DynamicCache()
    elif name == "DynamicCache chunked":
        cache, chunked = DynamicCache(), args.chunk
    elif name == "HF offloaded":
        cache = DynamicCache(offloading=True)
    else:
        tokens = ids.shape[1] + new_tokens
        share, depth = DEPTHS.get(name, (name, None))
        depth = args.prefetch_depth if depth is None else depth
        cfg = benchlib.kvtier_config(
            model,
            tokens,
            SHARES.get(share, 1.0),
            store,
            chunk=args.chunk,
            policy_prefetch_depth=depth,
        )
        cache = kvtier.TieredCache(model, cfg)
    try:
        with switched(name):
            out, result = benchlib.timed_generate(
                model, ids, cache, new_tokens, prefill_chunk_size=chunked
            )
    finally:
        if isinstance(cache, kvtier.TieredCache):
            cache.close()
        del cache
        gc.collect()
        if ids.is_cuda:
            torch.cuda.empty_cache()
    result["tokens"] = out[0, ids.shape[1] :].tolist()
    return result


def sweep(args, model, out_dir: Path) -> list[dict]:
    device = next(model.parameters()).device
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / benchlib.GiB
    store = tempfile.mkdtemp(prefix="kvtier-bench-")
    rows = []
    for context, rounds in zip(args.contexts, args.rounds, strict=True):
        names = systems(context, device, args.chunk_from)
        if args.systems:  # DynamicCache stays: its tokens are the reference
            names = [n for n in names if n == "DynamicCache" or n in args.systems]
            names += [n for n in A_B if n in args.systems]  # only when asked
        # --fresh-lengths: each run's prompt `step` tokens longer than the last's, past its
        # decode lengths
        step = 64 * (1 + args.new_tokens // 64) if args.fresh_lengths else 0
        torch.manual_seed(context)
        longest = context + step * rounds * len(names)
        prompt = torch.randint(0, model.config.vocab_size, (1, longest), device=device)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for round_index, name in itertools.product(range(rounds), names):
            # fresh lengths: every run its own prompt length, so no run meets a key length (an
            # attention shape: a cuDNN plan) that an earlier run of the process built
            done = sum(map(len, runs.values()))
            ids = prompt[:, : context + step * done]
            result = run_one(args, model, ids, name, store)
            result |= {"round": round_index, "prompt_tokens": ids.shape[1]}
            runs[name].append(result)
            with (out_dir / "runs.jsonl").open("a") as log:  # survives a cut-short run
                row = {k: v for k, v in result.items() if k not in ("stats", "tokens")}
                log.write(json.dumps({"context": context, "system": name, **row}) + "\n")
            print(
                f"{context} round {round_index} {name} ({ids.shape[1]} tokens): ttft "
                f"{result['ttft_s']:.2f} s, step {result['step_ms']:.1f} ms, peak "
                f"{result['peak_gib']:.2f} GiB",
                flush=True,
            )
        reference = runs["DynamicCache"][0]["tokens"]
        for name, results in runs.items():
            best = {
                "context": context,
                "system": name,
                "step_ms": min(r["step_ms"] for r in results),
                "ttft_s": min(r["ttft_s"] for r in results),
                "peak_over_weights_gib": min(r["peak_gib"] for r in results) - weights,
                "rounds": [{k: r[k] for k in ("ttft_s", "step_ms", "peak_gib")} for r in results],
                # with fresh lengths every run had its own prompt: no tokens to compare
                "tokens_match_dynamic": None
                if args.fresh_lengths
                else results[0]["tokens"] == reference,
            }
            if "stats" in results[0]:
                stats = results[0]["stats"]
                kv = stats["blocks"] * stats["block_bytes"]
                best |= {
                    "gpu_blocks": stats["gpu"]["blocks"],
                    "blocks": stats["blocks"],
                    "kv_bytes": kv,
                    "gpu_budget_bytes": stats["gpu"]["budget_bytes"],
                    "prefill_h2d_bytes": results[0]["prefill_h2d_bytes"],
                    "streamed_bytes_per_step": results[0]["decode_h2d_bytes_per_step"],
                }
            best["decode_tok_s"] = 1e3 / best["step_ms"]
            rows.append(best)
    return rows


def summarize(rows: list[dict], h2d_gbps: float) -> dict:
    """The ratios issue 8 asks for, from the best rounds (per context)."""
    by = {(r["context"], r["system"]): r for r in rows}
    out: dict = {"h2d_gbps": h2d_gbps}
    for context in sorted({r["context"] for r in rows}):
        fit, dyn = by.get((context, "kvtier 100%")), by.get((context, "DynamicCache"))
        tag = f"{context // 1024}k"
        if fit and dyn:
            out[f"decode_ratio_all_fit_{tag}"] = dyn["step_ms"] / fit["step_ms"]
            sdpa_decode = by.get((context, SDPA_DECODE))
            if sdpa_decode:
                out[f"decode_ratio_all_fit_sdpa_decode_{tag}"] = (
                    dyn["step_ms"] / sdpa_decode["step_ms"]
                )
            cudnn_prefill = by.get((context, CUDNN_PREFILL))
            if cudnn_prefill:
                out[f"ttft_ratio_cudnn_prefill_{tag}"] = cudnn_prefill["ttft_s"] / dyn["ttft_s"]
            out[f"ttft_ratio_{tag}"] = fit["ttft_s"] / dyn["ttft_s"]
        for name, key in (("kvtier 25%", "25"), ("kvtier min", "0")):
            row = by.get((context, name))
            if row and fit:
                floor = max(fit["step_ms"], 1e3 * row["streamed_bytes_per_step"] / h2d_gbps / 1e9)
                out[f"step_over_floor_{key}_{tag}"] = row["step_ms"] / floor
                out[f"achieved_h2d_gbps_{key}_{tag}"] = (
                    row["streamed_bytes_per_step"] / (row["step_ms"] / 1e3) / 1e9
                )
                out[f"prefill_h2d_bytes_over_kv_bytes_{key}_{tag}"] = (
                    row["prefill_h2d_bytes"] / row["kv_bytes"]
                )
        chunked = by.get((context, "DynamicCache chunked"))
        if chunked and fit:
            out[f"ttft_ratio_{tag}_same_chunk"] = fit["ttft_s"] / chunked["ttft_s"]
            stream = by.get((context, "kvtier 25%"))
            if stream:
                out[f"ttft_ratio_{tag}_same_chunk_streamed_25"] = (
                    stream["ttft_s"] / chunked["ttft_s"]
                )
    return out


def profile_all_fit(args, model, out_dir: Path) -> None:
    """torch.profiler over kvtier's all-fit decode: where each step's host time goes."""
    device = next(model.parameters()).device
    context = args.contexts[0]
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    store = tempfile.mkdtemp(prefix="kvtier-prof-")
    cfg = benchlib.kvtier_config(model, context + 16, 1.0, store, chunk=args.chunk)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with kvtier.TieredCache(model, cfg) as cache:
        with torch.profiler.profile(activities=activities) as prof:
            benchlib.timed_generate(model, ids, cache, 16)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    (out_dir / "profile_all_fit.txt").write_text(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    p.add_argument(
        "--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[32768, 131072]
    )
    p.add_argument("--rounds", type=lambda s: [int(x) for x in s.split(",")], default=[4, 2])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4096, help="prefill chunk, kvtier and HF")
    p.add_argument("--chunk-from", type=int, default=131072, help="chunked DynamicCache from")
    p.add_argument("--skip", default="", help="comma list of: fidelity,sweep,profile")
    p.add_argument(
        "--systems",
        type=lambda s: set(s.split(",")),
        default=None,
        help='only these, comma-separated (e.g. "kvtier 100%%,kvtier 25%%"); DynamicCache always',
    )
    p.add_argument(
        "--fresh-lengths",
        action="store_true",
        help="each run a new prompt length (as users see it: no attention shape seen before)",
    )
    p.add_argument("--prefetch-depth", type=int, default=1, help="kvtier's policy.prefetch_depth")
    p.add_argument("--out", default="bench-out")
    args = p.parse_args(argv)
    known = {"DynamicCache", "DynamicCache chunked", "HF offloaded", *SHARES, *A_B}
    if args.systems and args.systems - known:
        p.error(f"--systems: unknown {sorted(args.systems - known)}; choose from {sorted(known)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device(args.device)
    result: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    if "fidelity" not in skip:
        import fidelity

        result["teacher_forced"] = fidelity.teacher_forced(args, device)
        result["deterministic_fp32"] = fidelity.deterministic_fp32(args, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = benchlib.build_model(args.device, dtype, tiny=args.tiny)
    if "sweep" not in skip:
        h2d = benchlib.pinned_h2d_gbps() if device.type == "cuda" else float("nan")
        rows = sweep(args, model, out_dir)
        result |= {"rows": rows, "summary": summarize(rows, h2d)}
        print(json.dumps(result["summary"], indent=1))
    if "profile" not in skip:
        profile_all_fit(args, model, out_dir)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
