"""Prefix reuse benchmark: time to first token with a stored prefix against computing it.

An 8B-shaped Llama with random bf16 weights (or `--tiny`: a 4-layer fp32 model on CPU), a long
prompt (32K by default) of which `--shared` (90%) is a prefix an earlier request had:

  dynamic   the cold prompt through HF's DynamicCache (no kvtier at all)
  cold      a new prefix, nothing stored: the whole prompt is computed (the recompute baseline)
  host      the same process, the earlier request's cache still open (its blocks on GPU/host;
            with --first-gpu-budget 1GiB, on host)
  disk      a new process, the earlier request's blocks persisted on disk (disk.persist = true)
  fresh     another new process computing the same prompt with an empty store (what disk reuse
            must beat: a new process pays its first long prefill's pinning and kernel set-up);
            `--new-processes N` runs N of each, alternately, each with a tail of its own

For each: TTFT (generate() with max_new_tokens=1), prefix_hit_tokens, the cost model's decision
and its predicted load and recompute seconds next to the measured ones. Prints a table and
writes JSON (`--out`); docs/benchmarks.md has the H200 runs. `--tiny` is what the test suite
runs (tests/test_bench_reuse.py).

    python scripts/bench_reuse.py                 # H100/H200: 8B shape, 32K, bf16
    python scripts/bench_reuse.py --tiny          # CPU smoke run, seconds
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import kvtier

SHAPE_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
}
SHAPE_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 8192,
    "initializer_range": 0.2,
}


def build_model(tiny: bool) -> tuple[torch.nn.Module, str]:
    """The same random weights in every process (seed 0); the model key names them."""
    device = "cpu" if tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    config = LlamaConfig(**(SHAPE_TINY if tiny else SHAPE_8B), eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return model, f"bench-reuse-{'tiny' if tiny else '8b'}-seed0"


def prompt(args: argparse.Namespace, seed: int, vocab: int) -> torch.Tensor:
    """`--shared` of the tokens from seed 0 (the shared prefix), the rest from `seed`; seed 0:
    a prompt that shares nothing."""
    shared = int(args.tokens * args.shared)
    head = torch.randint(3, vocab, (1, shared), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    tail = torch.randint(3, vocab, (1, args.tokens - shared), generator=generator)
    if seed:
        return torch.cat([head, tail], dim=1)
    return torch.randint(3, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(7))


def config(args: argparse.Namespace, model_key: str) -> kvtier.Config:
    return kvtier.load_config(
        block_tokens=args.block_tokens,
        prefill_chunk_tokens=args.chunk,
        gpu_budget=args.gpu_budget,
        host_budget=args.host_budget,
        disk_budget=args.disk_budget,
        disk_path=args.store,
        disk_persist=True,
        disk_model_key=model_key,
        disk_codec="raw",
    )


def _phase_hooks(model, marks: dict[str, float]) -> list:
    """Hooks that note (after a sync) when the first decoder layer first starts and when the
    last one last ends: where a TTFT's time went, at the cost of two syncs."""
    layers = model.model.layers

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def first(module, args) -> None:
        marks.setdefault("first_layer", now())

    def last(module, args, output) -> None:
        marks["last_layer"] = now()

    return [layers[0].register_forward_pre_hook(first), layers[-1].register_forward_hook(last)]


def timed(
    model, cfg, ids: torch.Tensor, *, keep_open: bool = False, profile: str | None = None
) -> tuple[dict, object]:
    """TTFT of one generate() (its prefill) through a fresh TieredCache, and its stats.
    `profile`: a file for the cProfile summary of the call (it slows the call down a little)."""
    cache = kvtier.TieredCache(model, cfg)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    profiler = cProfile.Profile() if profile else None
    marks: dict[str, float] = {}
    hooks = _phase_hooks(model, marks)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    try:
        out = model.generate(
            ids.to(device), past_key_values=cache, max_new_tokens=1, do_sample=False
        )
    finally:
        for hook in hooks:
            hook.remove()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ttft = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).sort_stats("cumulative")
        stats.print_stats(45)
        stats.sort_stats("tottime").print_stats(25)
        Path(profile).write_text(f"TTFT {ttft:.3f} s (profiled)\n{text.getvalue()}")
    stats = cache.stats()
    first, last = marks.get("first_layer", started), marks.get("last_layer", started)
    row = {
        "ttft_s": round(ttft, 4),
        # until the first decoder layer runs (generate's set-up, lookup, load), the layers of
        # the prompt's computed part (every chunk), the rest (LM head, sampling)
        "phases_s": {
            "before_layers": round(first - started, 4),
            "layers": round(last - first, 4),
            "after_layers": round(started + ttft - last, 4),
        },
        "prefix_hit_tokens": stats["prefix_hit_tokens"],
        "reuse": stats["reuse"],
        "first_token": int(out[0, -1]),
        # where the load's time went: disk I/O seconds summed over the I/O threads, copies
        "io": {
            "disk_io_ms": stats["disk"]["io_ms"],
            "disk_bytes_read": stats["disk"]["bytes_read"],
            "transfer": stats["transfer"],
            "persist": stats["persist"],
        },
    }
    if not keep_open:
        cache.close()
        cache = None
    return row, cache


def run_phase(args: argparse.Namespace) -> dict:
    model, key = build_model(args.tiny)
    vocab = model.config.vocab_size
    cfg = config(args, key)
    warm = torch.randint(3, vocab, (1, args.block_tokens * 4), generator=torch.Generator())
    timed(model, cfg, warm)  # kernels, allocator, the store's first open
    profile = None if args.profile is None else Path(args.profile)
    # a new process's prompt: the shared prefix and a tail of its own (a disk run persists
    # its tail: the next round's must not find it)
    tail_seed = 3 + 2 * args.round
    if args.phase == "fresh":  # a new process computing the prompt: what disk reuse must beat
        empty = cfg.with_overrides(disk_path=tempfile.mkdtemp(prefix="kvtier-bench-fresh-"))
        row, _ = timed(model, empty, prompt(args, tail_seed, vocab))
        return {"fresh": row}
    if args.phase == "disk":  # a new process: only the persisted blocks are there
        row, _ = timed(model, cfg, prompt(args, tail_seed, vocab))
        if profile is not None:  # the same load again, profiled (its blocks in the page cache)
            timed(model, cfg, prompt(args, tail_seed, vocab), profile=f"{profile}.disk.txt")
        # the same prompt computed whole (an empty store), for the exactness check
        empty = cfg.with_overrides(disk_path=tempfile.mkdtemp(prefix="kvtier-bench-empty-"))
        check, _ = timed(model, empty, prompt(args, tail_seed, vocab))
        row["computed_first_token"] = check["first_token"]
        return {"disk": row}
    rows = {}
    first_cfg = (
        cfg.with_overrides(gpu_budget=args.first_gpu_budget) if args.first_gpu_budget else cfg
    )
    rows["first"], holder = timed(model, first_cfg, prompt(args, 1, vocab), keep_open=True)
    rows["host"], _ = timed(model, cfg, prompt(args, 2, vocab))
    if profile is not None:  # the same load again, profiled
        timed(model, cfg, prompt(args, 4, vocab), profile=f"{profile}.host.txt")
    holder.close()
    rows["cold"], _ = timed(model, cfg, prompt(args, 0, vocab))  # nothing of it stored
    rows["dynamic"] = dynamic_ttft(model, prompt(args, 0, vocab))
    return rows


def dynamic_ttft(model, ids: torch.Tensor) -> dict:
    """The same cold prompt through HF's DynamicCache (what a user compares reuse with)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(
        ids.to(device), past_key_values=DynamicCache(), max_new_tokens=1, do_sample=False
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"ttft_s": round(time.perf_counter() - started, 4), "prefix_hit_tokens": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="4-layer fp32 model on CPU")
    parser.add_argument("--tokens", type=int, help="prompt length (32768; --tiny 1024)")
    parser.add_argument("--shared", type=float, default=0.9, help="shared prefix fraction")
    parser.add_argument("--block-tokens", type=int, help="256 (--tiny 64)")
    parser.add_argument("--chunk", type=int, help="prefill_chunk_tokens (4096; --tiny 256)")
    parser.add_argument("--gpu-budget", default=None, help='"8GiB" (--tiny "4MiB")')
    parser.add_argument(
        "--first-gpu-budget",
        default=None,
        help="the first request's GPU budget (e.g. 1GiB: its blocks wait on host for the next)",
    )
    parser.add_argument("--host-budget", default=None, help='"24GiB" (--tiny "16MiB")')
    parser.add_argument("--disk-budget", default=None, help='"50%" of free disk (--tiny "64MiB")')
    parser.add_argument("--store", default=None, help="disk store (a new temp dir)")
    parser.add_argument("--out", default=None, help="JSON results file")
    parser.add_argument(
        "--profile",
        default=None,
        help="write cProfile summaries of a host and a disk load "
        "(repeated after the timed ones) to PROFILE.host.txt and PROFILE.disk.txt",
    )
    parser.add_argument(
        "--new-processes",
        type=int,
        default=1,
        help="disk and fresh new processes, alternately, this many of each (best TTFT reported)",
    )
    parser.add_argument(
        "--phase", default="same", choices=["same", "disk", "fresh"], help=argparse.SUPPRESS
    )
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = (
        (1024, 64, 256, "4MiB", "16MiB", "64MiB")
        if args.tiny
        else (32768, 256, 4096, "8GiB", "24GiB", "50%")
    )
    names = ("tokens", "block_tokens", "chunk", "gpu_budget", "host_budget", "disk_budget")
    for name, default in zip(names, defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.phase in ("disk", "fresh"):  # a child process: its row, as JSON
        print(json.dumps(run_phase(args)))
        return
    args.store = args.store or tempfile.mkdtemp(prefix="kvtier-bench-reuse-")
    rows = run_phase(args)
    child = [sys.executable, __file__, "--store", args.store]
    for name in names:
        child += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    child += ["--shared", str(args.shared)] + (["--tiny"] if args.tiny else [])
    child += ["--profile", args.profile] if args.profile else []
    runs: dict[str, list[dict]] = {"disk": [], "fresh": []}
    for round_ in range(max(1, args.new_processes)):  # alternately: the machine drifts
        for phase in ("disk", "fresh"):
            command = [*child, "--phase", phase, "--round", str(round_)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"the new-process phase {phase} failed:\n{done.stderr[-3000:]}")
            runs[phase].append(json.loads(done.stdout.strip().splitlines()[-1])[phase])
    for phase, rounds in runs.items():
        rows[phase] = min(rounds, key=lambda row: row["ttft_s"])
        rows[f"{phase}_ttfts_s"] = [row["ttft_s"] for row in rounds]
    report(args, rows)


def _phases(row: dict) -> str:
    phases = row.get("phases_s")
    if not phases:
        return "-"
    return "/".join(f"{phases[k]:.3f}" for k in ("before_layers", "layers", "after_layers"))


def report(args: argparse.Namespace, rows: dict) -> None:
    cold = rows["cold"]["ttft_s"]
    print(f"prompt {args.tokens} tokens, {args.shared:.0%} shared, blocks of {args.block_tokens}")
    print(
        f"{'case':<6} {'ttft_s':>9} {'vs cold':>8} {'hit':>7} {'decision':>10} "
        f"{'pred_load_s':>12} {'load_s':>9} {'pred_recompute_s':>17}  before/layers/after s"
    )
    for name in ("dynamic", "cold", "first", "host", "disk", "fresh"):
        row = rows[name]
        reuse = row.get("reuse") or {}
        print(
            f"{name:<6} {row['ttft_s']:>9.3f} {cold / row['ttft_s']:>7.2f}x "
            f"{row['prefix_hit_tokens']:>7} {reuse.get('decision', '-'):>10} "
            f"{reuse.get('predicted_load_s', 0):>12.4f} {reuse.get('load_s', 0):>9.4f} "
            f"{reuse.get('predicted_recompute_s', 0):>17.4f}  {_phases(row)}"
        )
    fresh = rows["fresh"]["ttft_s"]
    print(
        f"in a new process: disk reuse {rows['disk']['ttft_s']:.3f} s, computing the prompt "
        f"{fresh:.3f} s ({fresh / rows['disk']['ttft_s']:.2f}x; best of "
        f"{len(rows['disk_ttfts_s'])}: disk {rows['disk_ttfts_s']}, fresh {rows['fresh_ttfts_s']})"
    )
    same = rows["disk"]["first_token"] == rows["disk"]["computed_first_token"]
    print(f"disk reuse gives the first token computing the whole prompt gives: {same}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
