"""Shared pieces of the benchmarks: the model, kvtier budgets per GPU share, one timed generate().

A benchmark only measures: it prints and writes JSON; nothing here is imported by kvtier.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor

import kvtier
from kvtier.layout import KVGeometry, min_gpu_bytes

GiB = 1 << 30


class StepClock(LogitsProcessor):
    """Timestamps every step's logits; snapshots the cache's transfer counters at the first one
    (the end of prefill).

    On CUDA it records an event on the current stream at each call and reads the times after
    generate() (`finish`), so the clock itself syncs nothing: a token's time is when the stream
    that computes it got there. A device-wide synchronize here would also wait for copies queued
    on other streams for the *next* step (kvtier and HF's offloaded cache prefetch across the step
    boundary) and hold the host back from launching that step; even a sync of the current stream
    adds a wait generate() does not have. On the H200 at 32K with 25% of the KV on the GPU: 65.3
    ms a step with a device synchronize, 62.9 with a stream sync, 61.5 ms by the host's own clock
    at each step's first layer with no clock at all (scripts/probe_stream_gaps.py)."""

    def __init__(self, device: torch.device, cache=None) -> None:
        self.device = device
        self.cache = cache
        self.times: list[float] = []
        self.prefill_transfer: dict | None = None
        self._events: list[torch.cuda.Event] = []
        self._start: tuple[float, torch.cuda.Event] | None = None

    def start(self) -> float:
        """Mark the start (host clock, and an event on the stream); returns the host time."""
        now = time.perf_counter()
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._start = (now, event)
        return now

    def __call__(self, input_ids, scores):
        if self._start is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self._events.append(event)
        else:
            self.times.append(time.perf_counter())
        if self.prefill_transfer is None and isinstance(self.cache, kvtier.TieredCache):
            self.prefill_transfer = dict(self.cache.stats().get("transfer", {}))
        return scores

    def finish(self) -> None:
        """Turn the recorded events into host-clock times (after generate() returned)."""
        if self._start is None:
            return
        wall, first = self._start
        self._events[-1].synchronize()
        self.times = [wall + first.elapsed_time(event) / 1e3 for event in self._events]
        self._events.clear()


def build_model(device: str, dtype: torch.dtype, *, tiny: bool = False, layers: int | None = None):
    """A random Llama-3-8B-shaped model (or a tiny one for CPU smoke runs), SDPA attention."""
    if tiny:
        cfg = LlamaConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=layers or 4,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=1024,
            max_position_embeddings=1 << 21,
            initializer_range=0.2,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=layers or 32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=1 << 21,
            rope_theta=500000.0,
        )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def geometry(model, *, block_tokens: int) -> KVGeometry:
    c = model.config
    device = next(model.parameters()).device
    return KVGeometry(
        layer_ids=tuple(range(c.num_hidden_layers)),
        layer_devices=(device,) * c.num_hidden_layers,
        batch=1,
        kv_heads=c.num_key_value_heads,
        head_dim=c.hidden_size // c.num_attention_heads,
        dtype=model.dtype,
        block_tokens=block_tokens,
    )


def kvtier_config(model, tokens: int, share: float | str, store: str, *, chunk: int, **over):
    """Budgets for `tokens` positions: `share` of the blocks on the GPU ("min": the smallest
    budget that streams them); the host holds every block; no disk unless given."""
    kv = geometry(model, block_tokens=over.pop("block_tokens", 256))
    blocks = kv.blocks_for(tokens)
    buffers = over.get("policy_prefetch_depth", 1) + 1  # staging buffers of one layer each
    if share == "min":
        gpu = min_gpu_bytes(kv, buffers=buffers, tokens=tokens)
    elif share >= 1.0:
        gpu = blocks * kv.block_bytes
    else:
        staging = buffers * blocks * kv.block_tokens * kv.token_bytes
        gpu = staging + max(2, int(share * blocks)) * kv.block_bytes
    options = {
        "block_tokens": kv.block_tokens,
        "prefill_chunk_tokens": chunk,
        "gpu_budget": gpu,
        "host_budget": (blocks + 16) * kv.block_bytes,
        "disk_path": store,
        "disk_budget": 0,
        "policy_name": "sink_recent",
        "policy_sink_tokens": kv.block_tokens,
        "policy_recent_tokens": kv.block_tokens,
        "policy_prefetch_depth": 1,
    }
    return kvtier.load_config(None, **(options | over))


def timed_generate(model, ids, cache, new_tokens: int, *, prefill_chunk_size: int | None = None):
    """One greedy generate(): the sequences and what it measured (TTFT, decode step median,
    peak GPU memory, kvtier's transfer counters at the end of prefill and of the run)."""
    device = ids.device
    clock = StepClock(device, cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    options = {"prefill_chunk_size": prefill_chunk_size} if prefill_chunk_size else {}
    start = clock.start()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),  # random ids may hold the pad id: no padding
            past_key_values=cache,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=[clock],
            pad_token_id=0,
            **options,
        )
    total = time.perf_counter() - start
    clock.finish()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    result = {
        "ttft_s": clock.times[0] - start,
        "step_ms": 1e3 * statistics.median(steps) if steps else None,
        "total_s": total,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if device.type == "cuda" else 0.0,
    }
    if isinstance(cache, kvtier.TieredCache):
        stats = cache.stats()
        result["stats"] = stats
        result["prefill_h2d_bytes"] = (clock.prefill_transfer or {}).get("h2d_bytes", 0)
        result["decode_h2d_bytes_per_step"] = (
            stats["transfer"]["h2d_bytes"] - result["prefill_h2d_bytes"]
        ) / max(1, len(steps))
    return out, result


def pinned_h2d_gbps(mib: int = 256) -> float:
    """This machine's pinned host -> GPU copy speed for large copies (best of 5)."""
    host = torch.empty(mib << 20, dtype=torch.uint8).pin_memory()
    device = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return (mib << 20) / best / 1e9
