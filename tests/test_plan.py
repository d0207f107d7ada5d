"""The plan a cache checks at the first forward: a job that cannot fit is refused before any of
it is computed; one that fits whole gets its GPU room at once and is read in place."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import BLOCK_TOKENS, geometry, random_prompt

import kvtier
from kvtier.layout import min_gpu_bytes, plan_context


def test_refused_before_the_first_chunk_runs(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: a 600-token prompt whose KV neither the GPU nor host holds, and no disk tier:
    BudgetError from the first forward, before any layer ran (no token committed)."""
    model, config = tiny_model("llama")
    kv = geometry(config)
    calls = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = kvtier.load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=64,
        gpu_budget=min_gpu_bytes(kv, buffers=2, tokens=600) + 2 * kv.block_bytes,
        host_budget=8 * kv.block_bytes,
        disk_budget=0,
        disk_path=str(tmp_path / "store"),
    )
    cache = kvtier.TieredCache(model, cfg)
    try:
        with pytest.raises(kvtier.BudgetError, match="raise host.budget or disk.budget"):
            model.generate(random_prompt(600), past_key_values=cache, max_new_tokens=4)
        assert cache.get_seq_length() == 0
        # the prefix lookup builds the controller before the model runs, so the plan refuses
        # the job before even the first layer (it used to be at that layer's K/V)
        assert len(calls) == 0, "refused before the first layer of the first chunk"
    finally:
        hook.remove()
        cache.close()


def test_gpu_too_small_to_stream_is_named(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: a GPU budget that holds the streaming minimum for a short context but not for
    this prompt's staging: the message names the minimum for these tokens."""
    model, config = tiny_model("llama")
    kv = geometry(config)
    need = min_gpu_bytes(kv, buffers=2, tokens=1000)
    cfg = kvtier.load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=64,
        gpu_budget=need - 1,
        host_budget=200 * kv.block_bytes,
        disk_budget=0,
        disk_path=str(tmp_path / "store"),
    )
    with kvtier.TieredCache(model, cfg) as cache:
        with pytest.raises(kvtier.BudgetError, match=f"need at least {need}"):
            model.generate(random_prompt(1000), past_key_values=cache, max_new_tokens=2)


def test_a_prompt_that_fits_reserves_its_gpu_room_at_once(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: the prompt's blocks fit the GPU budget: the GPU pool is sized for them and a
    quarter more before the first chunk (no regrowth copies, which hold the KV twice, for the
    prompt nor the first tokens after it) and the sequence is read in place."""
    model, config = tiny_model("llama")
    kv = geometry(config)
    cfg = kvtier.load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=64,
        gpu_budget=40 * kv.block_bytes,
        host_budget=40 * kv.block_bytes,
        disk_budget=0,
        disk_path=str(tmp_path / "store"),
    )
    plan = plan_context(
        kv, 300, gpu_budget=40 * kv.block_bytes, host_budget=0, disk_budget=0, buffers=2
    )
    assert plan.in_place and plan.gpu_blocks == 19
    with kvtier.TieredCache(model, cfg) as cache:
        with torch.no_grad():
            model(random_prompt(300), past_key_values=cache, use_cache=True)
        pool = cache.controller.stores[min(cache.controller.stores)]
        assert pool.capacity_slots == 24 and not cache.controller.streaming  # 19 x 1.25
        tensors = list(pool._layers)
        with torch.no_grad():  # 40 decode steps: 22 blocks, inside the room reserved
            for token in random_prompt(40, seed=3)[0]:
                model(token.view(1, 1), past_key_values=cache, use_cache=True)
        assert all(a is b for a, b in zip(pool._layers, tensors, strict=True)), "it grew"
