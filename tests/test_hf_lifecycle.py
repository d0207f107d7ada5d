"""Lifecycle: any number of TieredCaches on one model, each independent; close() or dropping
one never touches another; a dropped cache frees itself when collected; a closed one says so."""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from conftest import (
    assert_all_tiers_used,
    assert_same_generation,
    hook_ids,
    random_prompt,
    reference_generate,
    tiered_config,
)
from transformers import DynamicCache

import kvtier
from kvtier.hf.hooks import ModelHooks

PROMPT_TOKENS = 150
NEW_TOKENS = 10


def _cfg(config: Any, tmp_path: Any, name: str) -> kvtier.Config:
    return tiered_config(config, tmp_path / name, PROMPT_TOKENS + NEW_TOKENS, host_blocks=4)


def _attached(model: Any) -> int:
    hooks = model.__dict__.get("_kvtier_hooks")
    return 0 if hooks is None else hooks.attached


def test_closing_one_cache_leaves_the_other_working(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: two caches on one model, the first closed before the second generates: the
    second keeps the shared hooks, streams through every tier and equals DynamicCache; the
    hooks go only with the last cache."""
    model, config = tiny_model("llama")
    before = hook_ids(model)
    prompt = random_prompt(PROMPT_TOKENS, seed=21)
    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)

    first = kvtier.TieredCache(model, _cfg(config, tmp_path, "a"))
    second = kvtier.TieredCache(model, _cfg(config, tmp_path, "b"))
    assert _attached(model) == 2
    first.close()
    got = reference_generate(model, prompt, cache=second, max_new_tokens=NEW_TOKENS)
    assert hook_ids(model) != before
    stats = second.stats()
    second.close()

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)
    assert hook_ids(model) == before and _attached(model) == 0


def _forward_loop(model: Any, cache: Any, ids: torch.Tensor, steps: int):
    """Prefill `ids`, then greedy steps one token at a time; yields each step's logits."""
    logits = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
    yield logits
    for _ in range(steps):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, past_key_values=cache, use_cache=True).logits[:, -1]
        yield logits


def test_two_caches_interleaved_step_by_step(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: two streaming caches on one model advanced in turn, one forward each: each
    gives the logits its own DynamicCache gives (the hooks serve the cache of each call)."""
    model, config = tiny_model("llama")
    prompts = [random_prompt(PROMPT_TOKENS, seed=22), random_prompt(PROMPT_TOKENS - 30, seed=23)]
    with torch.no_grad():
        expected = [
            list(_forward_loop(model, DynamicCache(config=config), p, NEW_TOKENS)) for p in prompts
        ]
        caches = [kvtier.TieredCache(model, _cfg(config, tmp_path, n)) for n in ("a", "b")]
        loops = [
            _forward_loop(model, c, p, NEW_TOKENS) for c, p in zip(caches, prompts, strict=True)
        ]
        got: list[list[torch.Tensor]] = [[], []]
        for _ in range(NEW_TOKENS + 1):
            for index, loop in enumerate(loops):
                got[index].append(next(loop))
    for index, cache in enumerate(caches):
        assert_all_tiers_used(cache.stats())
        cache.close()
        for step, (a, b) in enumerate(zip(expected[index], got[index], strict=True)):
            diff = (a - b).abs().max().item()
            assert diff <= 1e-5, f"cache {index} step {step}: max abs logit diff {diff}"


def test_dropped_cache_frees_itself_when_collected(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: a filled cache dropped without close() (output included) is collected: its
    tiers are empty, its hook attachment is gone, a second cache on the model is untouched."""
    model, config = tiny_model("llama")
    before = hook_ids(model)
    prompt = random_prompt(PROMPT_TOKENS, seed=24)
    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    kept = kvtier.TieredCache(model, _cfg(config, tmp_path, "kept"))

    dropped = kvtier.TieredCache(model, _cfg(config, tmp_path, "dropped"))
    output = reference_generate(model, prompt, cache=dropped, max_new_tokens=NEW_TOKENS)
    controller = dropped.controller
    assert_all_tiers_used(controller.stats())
    assert _attached(model) == 2
    del dropped, output
    gc.collect()

    assert _attached(model) == 1
    assert all(store.bytes_used == 0 for store in controller.stores.values())
    got = reference_generate(model, prompt, cache=kept, max_new_tokens=NEW_TOKENS)
    assert_same_generation(expected, got)
    del kept, got
    gc.collect()
    assert hook_ids(model) == before and "_kvtier_hooks" not in model.__dict__


def test_closed_cache_used_again_says_it_is_closed(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: generate() or .keys on a closed cache raise a one-line KVTierError saying it is
    closed; its stats() stay as they were when it closed."""
    model, config = tiny_model("llama")
    cache = kvtier.TieredCache(model, _cfg(config, tmp_path, "a"))
    reference_generate(model, random_prompt(40), cache=cache, max_new_tokens=4)
    stats = cache.stats()
    cache.close()
    cache.close()  # twice is harmless

    assert cache.closed and cache.stats() == stats
    for use in (
        lambda: reference_generate(model, random_prompt(40), cache=cache, max_new_tokens=4),
        lambda: cache.layers[0].keys,
    ):
        with pytest.raises(kvtier.KVTierError, match="closed") as error:
            use()
        assert "\n" not in str(error.value)


def test_hooks_of_one_model_ignore_another_models_cache(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: a forward given a cache the model's hooks do not know runs untouched."""
    model, config = tiny_model("llama")
    with kvtier.TieredCache(model, _cfg(config, tmp_path, "a")) as cache:
        hooks = model.__dict__["_kvtier_hooks"]
        assert isinstance(hooks, ModelHooks)
        assert hooks.driver_for(cache) is cache
        assert hooks.driver_for(DynamicCache(config=config)) is None
        assert hooks.driver_for(None) is None
