"""`kvtier demo`: SmolLM2 finds a passphrase hidden in a ~5K-token handbook, its KV in GPU, host
and disk, next to DynamicCache's answer from the same model.

Loads the real model (kvtier.zoo fetches it once per machine) and returns a DemoResult; it
never prints (the CLI does).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import DynamicCache, PreTrainedModel

from kvtier.config import Config, load_config
from kvtier.data import NEEDLE_QUESTION, needle_found, needle_messages
from kvtier.errors import ConfigError
from kvtier.hf.shape import kv_shape
from kvtier.layout import largest_chunk, spread_blocks, tier_budgets
from kvtier.planner import default_dtype, geometry_for
from kvtier.report import block_map_lines, columns, tier_table
from kvtier.runner import Generation, block_map, encode_prompt, first_mismatch, generate
from kvtier.sizes import format_size
from kvtier.zoo import load

log = logging.getLogger(__name__)

MODEL = "smollm2"
NEW_TOKENS = 24  # SmolLM2's answer is 17 tokens, its end of turn included
BLOCK_TOKENS = 256
MAX_CHUNK_TOKENS = 4096  # the default prefill chunk; the first chunk of the prompt fills GPU + host


@dataclass(frozen=True, slots=True)
class DemoResult:
    """Both runs of the demo; `reference` and `kvtier` are `Generation.to_dict()`."""

    model: str
    question: str
    reference: dict[str, Any]  # DynamicCache
    kvtier: dict[str, Any]  # TieredCache over GPU, host and disk
    tokens_match: bool
    first_mismatch: int | None  # index into the generated tokens, None when they all match
    found: bool  # kvtier's answer states the passphrase
    prompt_tokens: int
    load_s: float  # loading the model (fetching it, the first time)
    seconds: float  # the whole demo
    budgets: dict[str, int]  # bytes per tier, as given to load_config
    block_map: str  # where each block of the kvtier run lay at the end
    stats: dict[str, Any]  # TieredCache.stats() at the end


def run_demo(
    *,
    new_tokens: int = NEW_TOKENS,
    store: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
) -> DemoResult:
    """Ask SmolLM2 the needle question greedily with DynamicCache, then through a TieredCache
    whose budgets put blocks in all three tiers, and compare the tokens.

    The disk tier lives in `store`, or in a temporary folder removed afterwards. `json_path`
    receives the result as JSON."""
    from kvtier.hf.cache import TieredCache

    started = time.perf_counter()
    network, tokenizer = load(MODEL, dtype=default_dtype())
    load_s = time.perf_counter() - started
    prompt = encode_prompt(tokenizer, needle_messages()[0]["content"], chat=True)
    generate(network, tokenizer, prompt[:, :16], cache=DynamicCache(), max_new_tokens=2)  # warm-up
    log.info("reference run: DynamicCache, %d prompt tokens", prompt.shape[1])
    reference = generate(
        network,
        tokenizer,
        prompt,
        cache=DynamicCache(config=network.config),
        max_new_tokens=new_tokens,
    )
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as scratch:
        disk_path = Path(store) if store is not None else Path(scratch) / "store"
        cfg, budgets = demo_config(network, prompt.shape[1] + new_tokens, disk_path)
        log.info("kvtier run: budgets %s, store %s", budgets, disk_path)
        cache = TieredCache(network, cfg)
        try:
            tiered = generate(network, tokenizer, prompt, cache=cache, max_new_tokens=new_tokens)
            stats, letters = cache.stats(), block_map(cache)
        finally:
            cache.close()
    result = _result(reference, tiered, load_s, started, budgets, stats, letters)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def demo_config(
    network: PreTrainedModel, total_tokens: int, disk_path: Path
) -> tuple[Config, dict]:
    """A config whose budgets leave about a third of the blocks on the GPU, a few on disk and
    the rest on host, with a first prefill chunk as long as GPU and host can take open."""
    geometry = geometry_for(
        kv_shape(network.config), batch=1, dtype=network.dtype, block_tokens=BLOCK_TOKENS
    )
    split = spread_blocks(geometry.blocks_for(total_tokens))
    if split is None:
        raise ConfigError(f"the demo's {total_tokens} tokens are too few to reach the disk tier")
    gpu_blocks, host_blocks = split
    cfg = load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=min(MAX_CHUNK_TOKENS, largest_chunk(*split, BLOCK_TOKENS)),
        disk_path=str(disk_path),
        disk_persist=False,
        policy_name="sink_recent",  # the default: the block map shows its pins
    )
    budgets = tier_budgets(
        geometry,
        total_tokens,
        gpu_blocks=gpu_blocks,
        host_blocks=host_blocks,
        buffers=cfg.policy.prefetch_depth + 1,
    )
    return cfg.with_overrides(**budgets), budgets


def _result(
    reference: Generation,
    tiered: Generation,
    load_s: float,
    started: float,
    budgets: dict[str, int],
    stats: dict[str, Any],
    letters: str,
) -> DemoResult:
    mismatch = first_mismatch(reference.token_ids, tiered.token_ids)
    return DemoResult(
        model=MODEL,
        question=NEEDLE_QUESTION,
        reference=reference.to_dict(),
        kvtier=tiered.to_dict(),
        tokens_match=mismatch is None,
        first_mismatch=mismatch,
        found=needle_found(tiered.text),
        prompt_tokens=tiered.prompt_tokens,
        load_s=load_s,
        seconds=time.perf_counter() - started,
        budgets=budgets,
        block_map=letters,
        stats=stats,
    )


def format_demo(result: DemoResult) -> str:
    """Both answers, the verdicts, the tier table, both runs' timings and the block map."""
    ref, kv = result.reference, result.kvtier
    verdict = (
        "yes" if result.tokens_match else f"no (first difference at token {result.first_mismatch})"
    )
    lines = [
        f"kvtier demo: SmolLM2-135M-Instruct reads a {result.prompt_tokens}-token handbook "
        "with a passphrase hidden in it; its KV in GPU, host and disk",
        f"question: {result.question}",
        "",
        f"DynamicCache: {ref['text'].strip()}",
        f"kvtier:       {kv['text'].strip()}",
        f"tokens match: {verdict}; the answer states the passphrase: "
        f"{'yes' if result.found else 'no'}",
        "",
        *tier_table(result.stats),
        "",
        *columns(
            [
                ("RUN", "FIRST TOKEN", "PREFILL", "DECODE", "TOKENS"),
                *(
                    (
                        name,
                        f"{run['ttft_s']:.2f} s",
                        f"{run['prefill_tok_s']:.0f} tok/s",
                        f"{run['decode_tok_s']:.1f} tok/s",
                        str(run["new_tokens"]),
                    )
                    for name, run in (("DynamicCache", ref), ("kvtier", kv))
                ),
            ]
        ),
        "",
        *block_map_lines(result.block_map, result.stats.get("block_tokens", BLOCK_TOKENS)),
        "",
        "budgets: "
        + ", ".join(
            f"{name.removesuffix('_budget')} {format_size(size)}"
            for name, size in result.budgets.items()
        ),
        f"model loaded in {result.load_s:.1f} s; {result.seconds:.1f} s in all",
    ]
    return "\n".join(lines)
