"""`kvtier verify`: the check a user runs on their own model: greedy generation with DynamicCache
and with kvtier under budgets small enough that every tier holds blocks, compared token for
token and logit for logit.

Runs a loaded model twice; never prints and never loads weights itself.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvtier.config import Config
from kvtier.errors import KVTierError
from kvtier.hf.shape import kv_shape
from kvtier.layout import KVGeometry, largest_chunk, spread_blocks, tier_budgets
from kvtier.planner import geometry_for
from kvtier.runner import first_mismatch, generate

MIN_BLOCK_TOKENS = 16
TARGET_BLOCKS = 12  # enough blocks that a third, a half and the rest each make a tier


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Both runs compared; logits are compared while both runs share their context."""

    prompt_tokens: int
    reference_ids: list[int]
    kvtier_ids: list[int]
    tokens_match: bool
    first_mismatch: int | None
    max_logit_diff: float  # largest |logit difference| over the compared steps
    compared_steps: int  # steps up to and including the first mismatch (or all)
    every_tier_used: bool  # GPU, host and disk each held blocks, and disk was read back
    block_tokens: int
    prefill_chunk_tokens: int
    blocks: dict[str, int]  # the planned split: gpu, host, disk
    budgets: dict[str, int]
    stats: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    cfg: Config,
    *,
    max_new_tokens: int,
    store: Path | None = None,
) -> VerifyResult:
    """Greedy `max_new_tokens` from `prompt_ids` `[1, tokens]` with DynamicCache, then with a
    TieredCache under `cfg` with budgets, blocks and prefill chunks forced small enough that
    every tier holds blocks (the policy, codec and store path stay the user's; `store`
    replaces the path)."""
    from kvtier.hf.cache import TieredCache

    total = prompt_ids.shape[1] + max_new_tokens
    forced, blocks, budgets = verify_config(model, cfg, total, store=store)
    reference = generate(
        model,
        tokenizer,
        prompt_ids,
        cache=DynamicCache(config=model.config),
        max_new_tokens=max_new_tokens,
        keep_logits=True,
    )
    with tempfile.TemporaryDirectory(prefix="kvtier-verify-") as scratch:
        if store is None and cfg.sources.get("disk.path") == "default":
            forced = forced.with_overrides(disk_path=str(Path(scratch) / "store"))
        cache = TieredCache(model, forced)
        try:
            tiered = generate(
                model,
                tokenizer,
                prompt_ids,
                cache=cache,
                max_new_tokens=max_new_tokens,
                keep_logits=True,
            )
            stats = cache.stats()
        finally:
            cache.close()
    return _compare(reference, tiered, forced, blocks, budgets, stats)


def verify_config(
    model: PreTrainedModel, cfg: Config, total_tokens: int, *, store: Path | None = None
) -> tuple[Config, dict[str, int], dict[str, int]]:
    """`cfg` with blocks small enough for TARGET_BLOCKS, budgets that spread them over the three
    tiers, and prefill chunks whose open blocks fit GPU and host: (config, blocks, budgets)."""
    block_tokens = cfg.block_tokens
    if -(-total_tokens // block_tokens) < TARGET_BLOCKS:
        fitted = total_tokens // TARGET_BLOCKS // MIN_BLOCK_TOKENS * MIN_BLOCK_TOKENS
        block_tokens = max(MIN_BLOCK_TOKENS, fitted)
    geometry: KVGeometry = geometry_for(
        kv_shape(model.config), batch=1, dtype=model.dtype, block_tokens=block_tokens
    )
    count = geometry.blocks_for(total_tokens)
    split = spread_blocks(count)
    if split is None:
        shortest = 6 * MIN_BLOCK_TOKENS
        raise KVTierError(
            f"verify needs at least {shortest} tokens (prompt plus new) to put blocks in every "
            f"tier; got {total_tokens}: use a longer prompt or more --max-new-tokens"
        )
    gpu_blocks, host_blocks = split
    chunk = min(cfg.prefill_chunk_tokens, largest_chunk(gpu_blocks, host_blocks, block_tokens))
    budgets = tier_budgets(
        geometry,
        total_tokens,
        gpu_blocks=gpu_blocks,
        host_blocks=host_blocks,
        buffers=cfg.policy.prefetch_depth + 1,
    )
    overrides: dict[str, object] = {
        "block_tokens": block_tokens,
        "prefill_chunk_tokens": chunk,
        **budgets,
    }
    if store is not None:
        overrides["disk_path"] = str(store)
    blocks = {"gpu": gpu_blocks, "host": host_blocks, "disk": count - gpu_blocks - host_blocks}
    return cfg.with_overrides(**overrides), blocks, budgets


def _compare(reference, tiered, cfg: Config, blocks, budgets, stats) -> VerifyResult:
    mismatch = first_mismatch(reference.token_ids, tiered.token_ids)
    steps = min(len(reference.logits), len(tiered.logits))
    if mismatch is not None:
        steps = min(steps, mismatch + 1)  # the mismatch step still saw the same context
    diffs = [(reference.logits[i] - tiered.logits[i]).abs().max().item() for i in range(steps)]
    used = all(stats.get(t, {}).get("blocks", 0) > 0 for t in ("gpu", "host", "disk"))
    return VerifyResult(
        prompt_tokens=reference.prompt_tokens,
        reference_ids=reference.token_ids,
        kvtier_ids=tiered.token_ids,
        tokens_match=mismatch is None,
        first_mismatch=mismatch,
        max_logit_diff=max(diffs, default=0.0),
        compared_steps=steps,
        every_tier_used=used and stats.get("disk", {}).get("bytes_read", 0) > 0,
        block_tokens=cfg.block_tokens,
        prefill_chunk_tokens=cfg.prefill_chunk_tokens,
        blocks=blocks,
        budgets=budgets,
        stats=stats,
    )
