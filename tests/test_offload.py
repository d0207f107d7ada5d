"""kvtier.offload: every generate() in the block runs on a fresh TieredCache; exit restores."""

from __future__ import annotations

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

import kvtier

PROMPT_TOKENS = 200
NEW_TOKENS = 12


def _generate(model: Any, prompt: torch.Tensor, *, seed: int | None = None, **options: Any):
    """model.generate with no cache of its own (what offload replaces), dict outputs, logits."""
    if seed is not None:
        torch.manual_seed(seed)
    options = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **options}
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        output_logits=True,
        return_dict_in_generate=True,
        **options,
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"do_sample": True, "top_k": 20, "seed": 7}, {"num_beams": 3}],
    ids=["greedy", "sampling", "beam"],
)
def test_every_generate_runs_on_a_fresh_tiered_cache(
    options: dict, tiny_model: Any, tmp_path: Any
) -> None:
    """Scenario: inside offload, generate() without a cache equals DynamicCache (greedy,
    sampling, beam) through every tier; handle.stats() is that call's; exit restores all."""
    model, config = tiny_model("llama")
    prompt = random_prompt(PROMPT_TOKENS, seed=31)
    rows = options.get("num_beams", 1)
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS, batch_size=rows)
    before, generate_before = hook_ids(model), model.generate
    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS, **options)

    with kvtier.offload(model, cfg) as handle:
        got = _generate(model, prompt, **options)
        assert isinstance(got.past_key_values, kvtier.TieredCache)
        assert handle.cache is got.past_key_values
        stats = handle.stats()

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)
    assert stats["tokens"] == PROMPT_TOKENS + NEW_TOKENS - 1
    assert got.past_key_values.closed  # closed on exit, though the output still holds it
    assert hook_ids(model) == before and model.generate == generate_before
    assert "generate" not in model.__dict__


def test_sequential_calls_get_their_own_caches(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: two generate() calls in one block each get a new cache (stats of the latest
    only); a TieredCache passed explicitly is used as given; a second block works again."""
    model, config = tiny_model("llama")
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS)
    long, short = random_prompt(PROMPT_TOKENS, seed=32), random_prompt(40, seed=33)

    with kvtier.offload(model, cfg) as handle:
        first = _generate(model, long)
        second = _generate(model, short)
        assert first.past_key_values is not second.past_key_values
        assert handle.stats()["tokens"] == 40 + NEW_TOKENS - 1
        mine = kvtier.TieredCache(model, cfg)
        third = _generate(model, short, past_key_values=mine)
        assert third.past_key_values is mine and handle.calls == 2
    assert not mine.closed  # the caller's own cache is the caller's to close
    mine.close()
    assert_same_generation(reference_generate(model, long, max_new_tokens=NEW_TOKENS), first)
    assert_same_generation(reference_generate(model, short, max_new_tokens=NEW_TOKENS), third)

    with kvtier.offload(model, cfg) as again:
        _generate(model, short)
        assert again.stats()["tokens"] == 40 + NEW_TOKENS - 1


def test_nested_blocks_and_an_exception_inside(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: an inner block wins while open and gives the outer one back on exit; an
    exception inside a block propagates and still restores the model and removes the hooks."""
    model, config = tiny_model("llama")
    before = hook_ids(model)
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS)
    prompt = random_prompt(60, seed=34)

    with kvtier.offload(model, cfg) as outer:
        with kvtier.offload(model, cfg) as inner:
            _generate(model, prompt)
        assert inner.calls == 1 and outer.calls == 0
        _generate(model, prompt)
        assert outer.calls == 1
    assert hook_ids(model) == before and "generate" not in model.__dict__

    with pytest.raises(RuntimeError, match="boom"):
        with kvtier.offload(model, cfg) as handle:
            _generate(model, prompt)
            raise RuntimeError("boom")
    assert handle.cache is None or handle.cache.closed
    assert hook_ids(model) == before and "generate" not in model.__dict__


def test_a_failing_generate_leaves_no_hooks(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: a generate() that kvtier refuses (budget too small) raises BudgetError inside
    the block; the block's exit leaves the model as it was."""
    model, config = tiny_model("llama")
    before = hook_ids(model)
    cfg = tiered_config(config, tmp_path / "store", 64, host_blocks=1)
    with pytest.raises(kvtier.BudgetError):
        with kvtier.offload(model, cfg):
            _generate(model, random_prompt(PROMPT_TOKENS * 4, seed=35))
    assert hook_ids(model) == before and "generate" not in model.__dict__


def test_handle_refuses_to_be_a_cache_and_stats_before_a_call(
    tiny_model: Any, tmp_path: Any
) -> None:
    """Scenario: passing the handle as the cache, or asking stats() before any call, is a
    one-line KVTierError saying what to do instead."""
    model, config = tiny_model("llama")
    cfg = tiered_config(config, tmp_path / "store", 64)
    with kvtier.offload(model, cfg) as handle:
        with pytest.raises(kvtier.KVTierError, match="no generate"):
            handle.stats()
        with pytest.raises(kvtier.KVTierError, match="pass no cache"):
            _generate(model, random_prompt(20), past_key_values=handle)


def test_unsupported_model_is_refused_at_entry(tmp_path: Any) -> None:
    """Scenario: an encoder-decoder model fails at `with kvtier.offload(...)`, not mid-call."""
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(kvtier.UnsupportedModelError):
        with kvtier.offload(model, kvtier.load_config(None, disk_path=str(tmp_path))):
            pass
    assert "generate" not in model.__dict__
