"""Where time goes at 32K on the GPU: the streaming time to first token and the decode step.

A device probe for issue 8 (targets 1-3), not a benchmark of record: one process, variants
interleaved over rounds, each variant switching off one suspect by patching kvtier for the
length of its run (none of these patches is a user setting):

  dynamic        DynamicCache, HF's default generate() (no prefill chunks)
  kvtier         kvtier as shipped, `--share` of the KV on the GPU (0.25)
  chunk_major    prefill chunk by chunk instead of layer by layer
  hidden_gpu     layer-major, hidden states kept on the GPU between layers
  no_pin         host slabs stay pageable (no cudaHostRegister)
  cached_pin     host slabs from PyTorch's caching pinned allocator (kept between caches)
  all_fit        kvtier with every block on the GPU (the decode step against DynamicCache's)
  all_fit_flash  the same, decode attention forced to SDPA's flash backend

Then torch.profiler tables (self CPU and CUDA time) of one streaming prefill and of the decode
steps all-fit and streaming. Writes JSON and the tables under --out.

    python scripts/probe_ttft.py --out $OUT
    python scripts/probe_ttft.py --tiny --device cpu --context 2048 --out /tmp/p   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import benchlib
import torch
from transformers import DynamicCache, LogitsProcessor

import kvtier
import kvtier.hf.prefill as hf_prefill
from kvtier.blocks import Tier
from kvtier.hf import attention as kvtier_attention
from kvtier.hf.cache import TieredCache
from kvtier.tiers.host import HostPool


def _cached_pinned_slab(self, device, count):
    g = self.geometry
    shape = (self._layers_on(device), count, g.block_tokens, *g.token_shape)
    return torch.empty(shape, dtype=g.dtype, pin_memory=torch.cuda.is_available())


def _flash_decode(original):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention(module, query, *args, **kwargs):
        if query.shape[2] != 1:
            return original(module, query, *args, **kwargs)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return original(module, query, *args, **kwargs)

    return attention


VARIANTS = {
    "kvtier": lambda: contextlib.nullcontext(),
    "chunk_major": lambda: mock.patch.object(
        TieredCache, "layer_major_layers", lambda *a, **k: None
    ),
    "hidden_gpu": lambda: mock.patch.object(hf_prefill, "GPU_HIDDEN_BYTES", 1 << 62),
    "no_pin": lambda: mock.patch.object(HostPool, "_register", lambda self, slab: False),
    "cached_pin": lambda: contextlib.ExitStack(),  # filled in run_kvtier
    "all_fit": lambda: contextlib.nullcontext(),
    "all_fit_flash": lambda: mock.patch.object(
        kvtier_attention, "attention", _flash_decode(kvtier_attention.attention)
    ),
}


def run_kvtier(model, ids, cfg, variant: str, new_tokens: int) -> dict:
    with contextlib.ExitStack() as stack:
        stack.enter_context(VARIANTS[variant]())
        if variant == "cached_pin":
            stack.enter_context(mock.patch.object(HostPool, "_allocate_slab", _cached_pinned_slab))
            stack.enter_context(
                mock.patch.object(HostPool, "_free_slab_tensor", lambda self, t: None)
            )
        started = time.perf_counter()
        cache = kvtier.TieredCache(model, cfg)
        built = time.perf_counter() - started
        _, result = benchlib.timed_generate(model, ids, cache, new_tokens)
        host = cache.controller.stores[Tier.HOST] if cache.controller else None
        started = time.perf_counter()
        cache.close()
        closed = time.perf_counter() - started
    stats = result.pop("stats")
    result |= {
        "build_s": built,
        "close_s": closed,
        "host_blocks": stats["host"]["blocks"],
        "gpu_blocks": stats["gpu"]["blocks"],
        "pinned_bytes_at_end": getattr(host, "pinned_bytes", None),
    }
    return result


class StartProfiler(LogitsProcessor):
    """Starts `profiler` at the first token's logits: what it records is the decode steps
    (torch.profiler, or cProfile for the Python time of kvtier's and HF's code)."""

    def __init__(self, profiler) -> None:
        self.profiler, self.started = profiler, False

    def __call__(self, input_ids, scores):
        if not self.started:
            self.started = True
            if isinstance(self.profiler, cProfile.Profile):
                self.profiler.enable()
            else:
                self.profiler.start()
        return scores


def tables(prof, title: str) -> str:
    averages = prof.key_averages()
    parts = [f"## {title}: by self CPU time\n", averages.table("self_cpu_time_total", row_limit=25)]
    if torch.cuda.is_available():
        parts += [f"\n## {title}: by CUDA time\n", averages.table("cuda_time_total", row_limit=20)]
        parts += [f"\n## {title}: host-to-GPU copy engine\n{copy_engine(prof)}\n"]
    return "".join(parts) + "\n"


def copy_engine(prof) -> str:
    """How busy the host-to-GPU copies kept the copy engine over the profiled window: whether
    a streamed step's time above its bytes / bandwidth floor is idle time or slow copies."""
    copies = [e for e in prof.events() if "Memcpy HtoD" in e.name and e.device_type.name == "CUDA"]
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    if not copies or not kernels:
        return "no host-to-GPU copies"
    spans = sorted((e.time_range.start, e.time_range.end) for e in copies)
    busy, end = 0.0, float("-inf")
    for start, stop in spans:  # the union of copy intervals (copies on several streams overlap)
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    window = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    sizes = sorted(e.time_range.end - e.time_range.start for e in copies)
    return (
        f"{len(copies)} copies, busy {busy / 1e3:.1f} ms of a {window / 1e3:.1f} ms window "
        f"({busy / window:.1%}); copy duration median {sizes[len(sizes) // 2]:.0f} us, "
        f"shortest {sizes[0]:.0f} us, longest {sizes[-1]:.0f} us"
    )


def profiles(args, model, ids, store: str) -> str:
    """torch.profiler tables and cProfile's own-time list of 16 decode steps, DynamicCache's
    next to kvtier's all-fit and streaming ones; with --profile-prefill, a streaming prefill."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    out = []
    if args.profile_prefill:
        cfg = benchlib.kvtier_config(model, args.context + 16, args.share, store, chunk=args.chunk)
        with (
            kvtier.TieredCache(model, cfg) as cache,
            torch.profiler.profile(activities=activities) as p,
        ):
            benchlib.timed_generate(model, ids, cache, 1)
        out.append(tables(p, f"prefill {args.context}, {args.share} of KV on GPU"))
    for share in (None, 1.0, args.share):
        for python in (False, True):
            prof = cProfile.Profile() if python else torch.profiler.profile(activities=activities)
            with contextlib.ExitStack() as stack:
                if share is None:
                    cache, name = DynamicCache(), "DynamicCache"
                else:
                    cfg = benchlib.kvtier_config(
                        model, args.context + 16, share, store, chunk=args.chunk
                    )
                    cache = stack.enter_context(kvtier.TieredCache(model, cfg))
                    name = f"kvtier, {share} of KV on GPU"
                with torch.no_grad():
                    model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        past_key_values=cache,
                        max_new_tokens=17,
                        min_new_tokens=17,
                        do_sample=False,
                        logits_processor=[StartProfiler(prof)],
                        pad_token_id=0,
                    )
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                prof.disable() if python else prof.stop()
            title = f"16 decode steps at {args.context}, {name}"
            if python:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats("kvtier", 25)
                out.append(f"## {title}: cProfile\n{text.getvalue()}")
            else:
                out.append(tables(prof, title))
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--share", type=float, default=0.25)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--variants", default=",".join(["dynamic", *VARIANTS]))
    p.add_argument("--skip-profile", action="store_true")
    p.add_argument("--profile-prefill", action="store_true")
    p.add_argument("--out", default="probe-out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = benchlib.build_model(args.device, dtype, tiny=args.tiny)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=args.device)
    store = tempfile.mkdtemp(prefix="kvtier-probe-")
    cfg = benchlib.kvtier_config(
        model, args.context + args.new_tokens, args.share, store, chunk=args.chunk
    )
    h2d = benchlib.pinned_h2d_gbps() if args.device == "cuda" else None
    all_fit = benchlib.kvtier_config(
        model, args.context + args.new_tokens, 1.0, store, chunk=args.chunk
    )
    variants = args.variants.split(",")
    rows: list[dict] = []
    benchlib.timed_generate(model, ids[:, :4096], DynamicCache(), 2)  # kernels, allocator
    for round_ in range(args.rounds):
        for name in variants:
            if name == "dynamic":
                _, row = benchlib.timed_generate(model, ids, DynamicCache(), args.new_tokens)
            else:
                chosen = all_fit if name.startswith("all_fit") else cfg
                row = run_kvtier(model, ids, chosen, name, args.new_tokens)
            row |= {"variant": name, "round": round_}
            if h2d and row.get("decode_h2d_bytes_per_step") is not None:
                row["floor_ms"] = 1e3 * row["decode_h2d_bytes_per_step"] / (h2d * 1e9)
            rows.append(row)
            print(
                f"round {round_} {name:<12} ttft {row['ttft_s']:7.3f} s  step "
                f"{row['step_ms'] or 0:7.2f} ms  peak {row['peak_gib']:6.2f} GiB  "
                f"build {row.get('build_s', 0):.3f} s  close {row.get('close_s', 0):.3f} s",
                flush=True,
            )
    best = {}
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        best[name] = {
            "ttft_s": min(r["ttft_s"] for r in mine),
            "step_ms": min(r["step_ms"] for r in mine if r["step_ms"]),
            "every_ttft_s": [round(r["ttft_s"], 3) for r in mine],
        }
    summary = {"context": args.context, "share": args.share, "h2d_gbps": h2d, "best": best}
    print(json.dumps(summary, indent=1))
    (out / "probe_ttft.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    if not args.skip_profile:
        (out / "probe_profiles.txt").write_text(profiles(args, model, ids, store))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
