"""Host work a decode layer costs: TieredCache against DynamicCache on CPU, tiny tensors.

A 32-layer Llama of hidden size 64 on one CPU thread, a 1,024-token prompt: the kernels are so
small that what is timed is mostly Python and dispatch, the part that bounds an all-fit decode
step on a GPU. Prints, per round, the mean time of one layer's `update` (after a prefill) and
the median decode step, for both caches.

    python scripts/probe_decode_host.py --rounds 3
    python scripts/probe_decode_host.py --rounds 1 --profile "kvtier 25%"  # + cProfile summary

"kvtier 25%" streams: a quarter of the blocks on the (CPU) top tier, the rest gathered into
staging every step, which on a GPU is the host work per layer beside the PCIe copies.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

import kvtier  # noqa: E402

LAYERS = 32
STEPS = 64


def build() -> tuple[torch.nn.Module, LlamaConfig]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM(config).eval(), config


def prefilled(model, cache, ids: torch.Tensor):
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
    return cache, out.logits[:, -1:].argmax(-1)


def update_us(model, make, ids: torch.Tensor, *, calls: int = 2048) -> float:
    """Mean microseconds of one layer's update of one new position."""
    cache, _ = prefilled(model, make(), ids)
    keys = torch.randn(1, 2, 1, 16)
    values = torch.randn(1, 2, 1, 16)
    start = time.perf_counter()
    for _ in range(calls // LAYERS):
        for layer in range(LAYERS):
            cache.layers[layer].update(keys, values)
    return (time.perf_counter() - start) / calls * 1e6


def step_ms(model, make, ids: torch.Tensor, *, profile: cProfile.Profile | None = None) -> float:
    """Median milliseconds of one decode step (under `profile`, if given)."""
    cache, token = prefilled(model, make(), ids)
    times = []
    with torch.no_grad():
        if profile is not None:
            profile.enable()
        for _ in range(STEPS):
            start = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
        if profile is not None:
            profile.disable()
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="also print a cProfile summary of this cache's steps")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values's rename
    torch.set_num_threads(1)
    model, config = build()
    ids = torch.randint(0, 128, (1, 1024), generator=torch.Generator().manual_seed(0))
    caches = {
        "DynamicCache": lambda: DynamicCache(config=config),
        "kvtier": lambda: kvtier.TieredCache(model),
    }
    streamed = benchlib.kvtier_config(
        model, 1024 + STEPS + 8, 0.25, tempfile.mkdtemp(), chunk=1024, block_tokens=64
    )
    caches["kvtier 25%"] = lambda: kvtier.TieredCache(model, streamed)
    for round_index in range(args.rounds):
        parts = []
        for name, make in caches.items():
            update = (
                "" if name == "kvtier 25%" else f"update {update_us(model, make, ids):.1f} us, "
            )
            parts.append(f"{name} {update}step {step_ms(model, make, ids):.2f} ms")
        print(f"round {round_index}: " + "; ".join(parts), flush=True)
    if args.profile:
        profile = cProfile.Profile()
        step_ms(model, caches[args.profile], ids, profile=profile)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
