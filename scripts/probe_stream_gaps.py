"""Where the host-to-GPU copy engine sits idle during streamed decode steps (issue 8, target 2).

A device probe, not a benchmark of record. For each GPU share it profiles 16 decode steps at
`--context` with torch.profiler and reads the trace: every gap between host-to-GPU copies
(the union of their intervals), how long, where in the step (time since the step's LM-head
matmul, the largest matmul of a step), whether the GPU ran anything else in it, and which
kernels or copies ran during it. A streamed step at the PCIe floor keeps that engine busy;
the gaps are what a step spends above it.

    python scripts/probe_stream_gaps.py --out $OUT
    python scripts/probe_stream_gaps.py --host-only --events --rounds 3 --out $OUT  # no profiler
    python scripts/probe_stream_gaps.py --tiny --device cpu --context 2048 --out /tmp/g  # smoke
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import torch
from probe_ttft import StartProfiler
from transformers import DynamicCache

import kvtier

STEPS = 16


def _spans(intervals) -> list[tuple[float, float]]:
    """The union of (start, end) intervals, sorted."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _overlap(a: float, b: float, start: float, end: float) -> float:
    return max(0.0, min(b, end) - max(a, start))


def gaps(prof, *, min_us: float = 5.0) -> dict:
    """The copy engine's idle gaps over the profiled steps, attributed (kineto's events: GPU
    activity with its stream, and the CPU launch call each one came from)."""
    events = list(prof.profiler.kineto_results.events())
    gpu = [e for e in events if e.device_type().name == "CUDA"]
    h2d = [e for e in gpu if "Memcpy HtoD" in e.name()]
    if not h2d:
        return {"h2d_copies": 0}
    launches = {e.correlation_id(): e for e in events if e.device_type().name == "CPU"}
    us = 1e-3

    def span(e) -> tuple[float, float]:
        return e.start_ns() * us, e.end_ns() * us

    busy = _spans(span(e) for e in h2d)
    others = [e for e in gpu if "Memcpy HtoD" not in e.name()]
    everything = _spans(span(e) for e in gpu)
    by_name = collections.defaultdict(list)
    for e in others:
        by_name[e.name()].append(e)
    heads = [  # the LM head: the kernel running once a step that takes longest
        n for n, evs in by_name.items() if len(evs) == STEPS and "Memcpy" not in n
    ]
    head = max(heads, key=lambda n: sum(e.duration_ns() for e in by_name[n]), default=None)
    head_starts = sorted(span(e)[0] for e in by_name[head]) if head else []
    after = sorted(h2d, key=lambda e: e.start_ns())
    firsts = {round(span(e)[0], 3): e for e in after}
    rows = []
    for (_, a), (b, _) in zip(busy, busy[1:], strict=False):
        if b - a < min_us:
            continue
        during = collections.Counter()
        for e in others:
            s, t = span(e)
            if (spent := _overlap(a, b, s, t)) > 0:
                during[f"{e.name()[:50]} @stream{e.device_resource_id()}"] += spent
        gpu_busy = sum(_overlap(a, b, s, t) for s, t in everything)
        since_head = [a - h for h in head_starts if h <= a]
        nxt = firsts.get(round(b, 3))
        launch = launches.get(nxt.correlation_id()) if nxt is not None else None
        rows.append(
            {
                "gap_us": round(b - a, 1),
                "after_head_us": round(min(since_head), 1) if since_head else None,
                "gpu_idle_us": round((b - a) - gpu_busy, 1),
                # > 0: the copy after the gap was launched before the engine went idle (it
                # waited on another stream); < 0: launched late, the host was behind
                "next_launched_before_idle_us": (
                    round(a - launch.start_ns() * us, 1) if launch is not None else None
                ),
                "during": {k: round(v, 1) for k, v in during.most_common(4)},
            }
        )
    window = busy[-1][1] - busy[0][0]
    total = sum(r["gap_us"] for r in rows)
    late = [r for r in rows if (r["next_launched_before_idle_us"] or 0) < 0]
    sizes = sorted(e.duration_ns() * us for e in h2d)
    streams = collections.Counter(e.device_resource_id() for e in h2d)
    return {
        "h2d_copies": len(h2d),
        "h2d_streams": dict(streams),
        "window_ms": round(window / 1e3, 2),
        "busy_ms": round(sum(b - a for a, b in busy) / 1e3, 2),
        "gap_ms": round(total / 1e3, 2),
        "gap_ms_host_late": round(sum(r["gap_us"] for r in late) / 1e3, 2),
        "gap_ms_within_3ms_after_lm_head": round(
            sum(r["gap_us"] for r in rows if (r["after_head_us"] or 1e9) < 3000) / 1e3, 2
        ),
        "gap_ms_gpu_idle": round(sum(r["gpu_idle_us"] for r in rows) / 1e3, 2),
        "gaps": len(rows),
        "lm_head_kernel": head,
        "copy_us_median": round(sizes[len(sizes) // 2], 1),
        "d2d_on_copy_streams_ms": round(
            sum(
                e.duration_ns() * us
                for e in others
                if "Memcpy DtoD" in e.name() and e.device_resource_id() in streams
            )
            / 1e3,
            2,
        ),
        "largest_gaps": sorted(rows, key=lambda r: -r["gap_us"])[:24],
        "gap_histogram_us": _histogram([r["gap_us"] for r in rows]),
    }


def _histogram(values: list[float]) -> dict:
    edges = [5, 20, 50, 100, 200, 500, 1000, 2000, 1e9]
    out = {}
    for low, high in zip(edges, edges[1:], strict=False):
        chosen = [v for v in values if low <= v < high]
        out[f"{low:g}-{high:g}"] = [len(chosen), round(sum(chosen) / 1e3, 3)]
    return out


def _decode(model, ids, cache, processors=()) -> None:
    """Prefill `ids` and decode STEPS tokens greedily through `cache`."""
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        max_new_tokens=STEPS + 1,
        min_new_tokens=STEPS + 1,
        do_sample=False,
        logits_processor=list(processors),
        pad_token_id=0,
    )


def host_timeline(model, ids, cfg) -> dict:
    """No profiler: host clock at each decoder layer's pre-hook and the time spent in the
    cache's update() per layer, over STEPS decode steps. A host that runs ahead of the copy
    engine passes layers faster than a layer's copy takes; one held back by a wait in
    update() passes them at the copy's pace."""
    layers = model.model.layers
    marks: list[tuple[int, float]] = []
    in_update: list[float] = []
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, i=i: marks.append((i, time.perf_counter()))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        made = DynamicCache() if cfg is None else kvtier.TieredCache(model, cfg)
        with (
            contextlib.closing(made) if cfg is not None else contextlib.nullcontext(made) as cache,
            torch.no_grad(),
        ):
            update = cache.update

            def timed(*a, **k):
                start = time.perf_counter()
                try:
                    return update(*a, **k)
                finally:
                    in_update.append(time.perf_counter() - start)

            cache.update = timed
            _decode(model, ids, cache)
            stats = cache.stats() if cfg is not None else {}
    finally:
        for handle in handles:
            handle.remove()
    n = len(layers)
    decode = marks[-STEPS * n :]  # the decode steps' layers (the prefill's come first)
    updates = in_update[-STEPS * n :]
    step_starts = [t for i, t in decode if i == 0]
    per_layer = collections.defaultdict(list)
    for (i, t), (_, u) in zip(decode, decode[1:], strict=False):
        per_layer[i].append(u - t)
    by_layer = [updates[k::n] for k in range(n)]

    def ms(values) -> float:
        return round(1e3 * sorted(values)[len(values) // 2], 3) if values else None

    lasts = [t for i, t in decode if i == n - 1]
    return {
        "step_ms_median": ms([b - a for a, b in zip(step_starts, step_starts[1:], strict=False)]),
        # host time from a step's first layer to its last one's start: launching, not waiting
        "first_to_last_layer_ms_median": ms(
            [b - a for a, b in zip(step_starts, lasts, strict=False)]
        ),
        "layer_to_next_ms_median": {i: ms(v) for i, v in sorted(per_layer.items())},
        "update_ms_median_by_layer": [ms(v) for v in by_layer],
        "timings": stats.get("timings"),
        "stats_transfer": stats.get("transfer"),
    }


def copy_timeline(model, ids, cfg) -> dict:
    """No profiler: a CUDA event at the end of each gather's host-to-GPU copies and at each
    step's logits, read after generate(). The copy stream runs the gathers in order, so the time
    between two gathers' ends beyond what the later one's bytes take at the best rate seen is
    the engine's idle time before it (or on-device copies queued in series with it). Reported
    per step by the layer each gather is for: where in the step the copy engine waits."""
    from kvtier.controller.streaming import Streamer
    from kvtier.transfer import Lane, Mover

    marks: list[tuple[int, torch.cuda.Event, int]] = []  # (tiered layer, event, H2D bytes)
    layer = [None]
    submit, on_streams = Streamer._submit, Mover._on_streams

    def timed_submit(self, tiered_index, tokens):
        layer[0] = tiered_index
        try:
            return submit(self, tiered_index, tokens)
        finally:
            layer[0] = None

    def timed_streams(self, lane, device, groups, target):
        events = on_streams(self, lane, device, groups, target)
        h2d = sum(src.nbytes for group in groups for src, _ in group if not src.is_cuda)
        if lane is Lane.PREFETCH and h2d and layer[0] is not None:
            end = torch.cuda.Event(enable_timing=True)  # behind the host-to-GPU group's copies
            end.record(self._stream(lane, device, resident=False))
            marks.append((layer[0], end, h2d))
        return events

    Streamer._submit, Mover._on_streams = timed_submit, timed_streams
    try:
        with kvtier.TieredCache(model, cfg) as cache, torch.no_grad():
            _decode(model, ids, cache)
            torch.cuda.synchronize()
    finally:
        Streamer._submit, Mover._on_streams = submit, on_streams
    layers = len(cache.spec.tiered_layers)
    decode = marks[-STEPS * layers :]
    ends = [event for _, event, _ in decode]
    spans = [a.elapsed_time(b) for a, b in zip(ends, ends[1:], strict=False)]  # ms
    best_gbps = max(n / 1e6 / ms for (_, _, n), ms in zip(decode[1:], spans, strict=True) if ms)
    by_layer = collections.defaultdict(list)
    for (index, _, nbytes), ms in zip(decode[1:], spans, strict=True):
        by_layer[index].append(ms - nbytes / 1e6 / best_gbps)
    idle = {i: round(sum(v) / len(v), 3) for i, v in sorted(by_layer.items())}
    total = ends[0].elapsed_time(ends[-1])
    return {
        "gathers": len(decode),
        "best_gbps": round(best_gbps, 2),
        "copy_ms_per_step": round(total / (len(decode) - 1) * layers, 3),
        "idle_ms_per_step": round(sum(idle.values()), 3),
        "idle_ms_before_gather_of_layer": idle,
    }


def profile_decode(model, ids, cfg, trace: Path | None, *, cpu: bool) -> tuple[dict, dict]:
    activities = [torch.profiler.ProfilerActivity.CPU] if cpu else []
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    with kvtier.TieredCache(model, cfg) as cache, torch.no_grad():
        _decode(model, ids, cache, [StartProfiler(prof)])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.stop()
        stats = cache.stats()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    return gaps(prof), stats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--shares", default="0.25,min")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--trace", action="store_true", help="also write each chrome trace")
    p.add_argument("--host-only", action="store_true", help="the host timeline, no profiles")
    p.add_argument("--rounds", type=int, default=1, help="interleaved host-timeline rounds")
    p.add_argument("--events", action="store_true", help="also the event-timed copy timeline")
    p.add_argument("--out", default="probe-out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = benchlib.build_model(args.device, dtype, tiny=args.tiny)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=args.device)
    store = tempfile.mkdtemp(prefix="kvtier-gaps-")
    results = {}
    shares = args.shares.split(",")
    configs = {}
    for text in shares:
        share = text if text == "min" else None if text == "dynamic" else float(text)
        configs[text] = (
            None
            if share is None
            else benchlib.kvtier_config(
                model, args.context + STEPS + 2, share, store, chunk=args.chunk
            )
        )
        host_timeline(model, ids, configs[text])  # warm-up: kernels, plans, allocator
    for round_ in range(args.rounds):  # interleaved: the host's speed drifts between rounds
        for text in shares:
            found = host_timeline(model, ids, configs[text])
            results.setdefault(text, {}).setdefault("host_rounds", []).append(found)
            print(f"round {round_} {text} host: " + json.dumps(found)[:400])
            if args.events and configs[text] is not None and torch.cuda.is_available():
                found = copy_timeline(model, ids, configs[text])
                results[text].setdefault("copy_rounds", []).append(found)
                print(f"round {round_} {text} copies: " + json.dumps(found))
    for text in shares:
        if configs[text] is None or args.host_only:
            continue
        cfg = configs[text]
        for cpu in (False, True) if torch.cuda.is_available() else (True,):
            trace = out / f"trace_{text}_{'cpu' if cpu else 'cuda'}.json" if args.trace else None
            found, stats = profile_decode(model, ids, cfg, trace, cpu=cpu)
            found["h2d_bytes_total"] = stats["transfer"]["h2d_bytes"]
            results[text]["cpu_and_cuda" if cpu else "cuda_only"] = found
            brief = {k: v for k, v in found.items() if k != "largest_gaps"}
            print(f"share {text} profiled {'cpu+cuda' if cpu else 'cuda'}: " + json.dumps(brief))
    (out / "stream_gaps.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
