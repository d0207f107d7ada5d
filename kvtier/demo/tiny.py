"""`kvtier demo --tiny`: a tiny random Llama through GPU, host and disk; DynamicCache checks it.

Builds everything locally (no downloads) and returns a TinyDemoResult; it never prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    Cache,
    DynamicCache,
    LlamaConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
)

from kvtier.config import Config, load_config
from kvtier.errors import ConfigError
from kvtier.layout import MIN_GPU_BLOCKS, KVGeometry, tier_budgets
from kvtier.report import tier_table
from kvtier.runner import CACHE_KWARG

log = logging.getLogger(__name__)

BLOCK_TOKENS = 16
PREFILL_CHUNK_TOKENS = 128
PREFETCH_DEPTH = 1


@dataclass(frozen=True, slots=True)
class TinyDemoResult:
    """What one demo run measured; `stats` is `TieredCache.stats()` at the end of the kvtier run."""

    tokens_match: bool
    first_mismatch: int | None  # index into the new tokens, None when they all match
    prompt_tokens: int
    new_tokens: int
    reference_prefill_s: float  # generate() start to the first token's logits
    kvtier_prefill_s: float
    reference_tok_s: float  # decode: tokens after the first / their seconds
    kvtier_tok_s: float
    seconds: float  # the whole demo, model build included
    budgets: dict[str, int]  # bytes per tier, as passed to load_config
    stats: dict[str, Any]


def run_tiny_demo(
    *,
    prompt_tokens: int = 3000,
    new_tokens: int = 32,
    seed: int = 0,
    store: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
) -> TinyDemoResult:
    """Generate greedily with DynamicCache, then with TieredCache over all three tiers, and compare.

    The disk tier lives in `store`, or in a temporary folder removed afterwards. `json_path`, when
    given, receives the result (stats included) as JSON. Raises ConfigError for sizes too small to
    reach the disk tier.
    """
    gpu_blocks, host_blocks = _block_split(prompt_tokens, new_tokens)
    total_tokens = prompt_tokens + new_tokens
    from kvtier.hf.cache import TieredCache

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvtier-demo-") as scratch:
        log.info("building a tiny random Llama (%d-token prompt, seed %d)", prompt_tokens, seed)
        model = _build_model(Path(scratch) / "model", seed=seed, max_tokens=total_tokens)
        prompt = torch.randint(
            3,
            model.config.vocab_size,
            (1, prompt_tokens),
            generator=torch.Generator().manual_seed(seed),
        )
        _generate(model, prompt[:, :BLOCK_TOKENS], DynamicCache(config=model.config), 2)  # warm-up

        log.info("reference run: DynamicCache, all KV on the device")
        reference, reference_prefill_s, reference_tok_s = _generate(
            model, prompt, DynamicCache(config=model.config), new_tokens
        )

        disk_path = Path(store) if store is not None else Path(scratch) / "store"
        budgets = _budgets(model, total_tokens, gpu_blocks, host_blocks)
        cfg = _config(budgets, disk_path)
        log.info(
            "kvtier run: %d blocks, about %d on GPU, %d on host, the rest on disk at %s",
            math.ceil(total_tokens / BLOCK_TOKENS),
            gpu_blocks,
            host_blocks,
            disk_path,
        )
        cache = TieredCache(model, cfg)
        try:
            tiered, kvtier_prefill_s, kvtier_tok_s = _generate(model, prompt, cache, new_tokens)
            stats = cache.stats()
        finally:
            cache.close()

    result = _result(
        reference[0, prompt_tokens:].tolist(),
        tiered[0, prompt_tokens:].tolist(),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        reference_prefill_s=reference_prefill_s,
        kvtier_prefill_s=kvtier_prefill_s,
        reference_tok_s=reference_tok_s,
        kvtier_tok_s=kvtier_tok_s,
        seconds=time.perf_counter() - started,
        budgets=budgets,
        stats=stats,
    )
    log.info("tokens match: %s", "yes" if result.tokens_match else "no")
    if json_path is not None:
        Path(json_path).write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return result


def _result(expected: list[int], got: list[int], **measured: Any) -> TinyDemoResult:
    first_mismatch = _first_mismatch(expected, got)
    return TinyDemoResult(
        tokens_match=first_mismatch is None, first_mismatch=first_mismatch, **measured
    )


def _block_split(prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
    """GPU and host blocks that leave the rest of the demo's blocks on disk; ConfigError if the
    run is too short to reach the disk."""
    if new_tokens < 2:
        raise ConfigError(
            f"demo new_tokens = {new_tokens}; use at least 2 (one prefill, one decode)"
        )
    block_count = math.ceil((prompt_tokens + new_tokens) / BLOCK_TOKENS)
    fewest_gpu_blocks = MIN_GPU_BLOCKS + 2  # a few resident blocks, so every tier holds some
    fewest_host_blocks = PREFILL_CHUNK_TOKENS // BLOCK_TOKENS + 2  # one prefill chunk seals
    gpu_blocks = max(fewest_gpu_blocks, block_count // 8)
    host_blocks = max(fewest_host_blocks, block_count // 4)
    if block_count <= gpu_blocks + host_blocks:
        shortest = (fewest_gpu_blocks + fewest_host_blocks) * BLOCK_TOKENS + 1 - new_tokens
        raise ConfigError(
            f"demo prompt_tokens = {prompt_tokens} is too short to reach the disk tier; "
            f"use at least {shortest}"
        )
    return gpu_blocks, host_blocks


def _config(budgets: dict[str, int], disk_path: Path) -> Config:
    return load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        disk_path=str(disk_path),
        policy_name="lru",  # pins nothing, so the minimum GPU budget has no pinned term
        policy_prefetch_depth=PREFETCH_DEPTH,
        prefill_chunk_tokens=PREFILL_CHUNK_TOKENS,
        **budgets,
    )


def _budgets(
    model: PreTrainedModel, total_tokens: int, gpu_blocks: int, host_blocks: int
) -> dict[str, int]:
    text = model.config
    geometry = KVGeometry(
        layer_ids=tuple(range(text.num_hidden_layers)),
        layer_devices=(torch.device("cpu"),) * text.num_hidden_layers,
        batch=1,
        kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        dtype=torch.float32,
        block_tokens=BLOCK_TOKENS,
    )
    return tier_budgets(
        geometry,
        total_tokens,
        gpu_blocks=gpu_blocks,
        host_blocks=host_blocks,
        buffers=PREFETCH_DEPTH + 1,
    )


def format_tiny_demo(result: TinyDemoResult) -> str:
    """A short table: blocks and bytes per tier, speed of both runs, whether the tokens match."""
    lines = [
        f"kvtier demo --tiny: tiny random Llama, {result.prompt_tokens}-token prompt, "
        f"{result.new_tokens} new tokens, {result.seconds:.1f} s",
        "",
        *tier_table(result.stats),
    ]
    lines += [
        "",
        f"{'run':<14}{'prefill s':>10}{'decode tok/s':>14}",
        f"{'DynamicCache':<14}{result.reference_prefill_s:>10.2f}{result.reference_tok_s:>14.1f}",
        f"{'kvtier':<14}{result.kvtier_prefill_s:>10.2f}{result.kvtier_tok_s:>14.1f}",
        "",
        f"tokens match: {'yes' if result.tokens_match else 'no'}"
        + (
            ""
            if result.tokens_match
            else f" (first difference at new token {result.first_mismatch})"
        ),
    ]
    return "\n".join(lines)


def _build_model(directory: Path, *, seed: int, max_tokens: int) -> PreTrainedModel:
    """A tiny random Llama, saved and loaded back the way a user's checkpoint would be."""
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=512,
        max_position_embeddings=max(4096, max_tokens),
        # HF's default 0.02 leaves a tiny model nearly blind to attention, so wrong K/V could still
        # give the right tokens (DESIGN.md, Testing); 0.2 makes the comparison mean something.
        initializer_range=0.2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,  # never stop early: both runs produce exactly new_tokens
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


class _StepClock(LogitsProcessor):
    """Notes when each step's logits are ready; the first one marks the end of prefill."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


def _generate(
    model: PreTrainedModel, prompt: torch.Tensor, cache: Cache, new_tokens: int
) -> tuple[torch.Tensor, float, float]:
    """Greedy generate() through `cache`: the sequences, prefill seconds and decode tok/s."""
    clock = _StepClock()
    started = time.perf_counter()
    sequences = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        **{CACHE_KWARG: cache},
        max_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    first, last = clock.times[0], clock.times[-1]
    decode_tok_s = (len(clock.times) - 1) / (last - first) if last > first else 0.0
    return sequences, first - started, decode_tok_s


def _first_mismatch(expected: list[int], got: list[int]) -> int | None:
    """Index of the first differing token, or None when the lists are equal."""
    for index, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            return index
    return None if len(expected) == len(got) else min(len(expected), len(got))
