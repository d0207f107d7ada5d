"""The cache surface: TieredCache answers HF's Cache API (layers' keys/values, len, indexing,
iteration, sizes, edits) as DynamicCache does, or raises a KVTierError naming the alternative."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from conftest import (
    assert_all_tiers_used,
    assert_same_generation,
    random_prompt,
    reference_generate,
    tiered_config,
)
from transformers import DynamicCache

import kvtier
from kvtier.hf import layer as layer_module

PROMPT_TOKENS = 120
NEW_TOKENS = 8


def assert_same_layers(expected: DynamicCache, got: kvtier.TieredCache) -> None:
    """Every layer's keys and values: same shape, dtype, and values (fp32 ATOL of DESIGN.md 9)."""
    assert len(got) == len(expected)
    for index, (want, have) in enumerate(zip(expected.layers, got.layers, strict=True)):
        for name in ("keys", "values"):
            a, b = getattr(want, name), getattr(have, name)
            assert b.shape == a.shape and b.dtype == a.dtype, (index, name, b.shape, a.shape)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"layer {index} {name}")


def _both(model: Any, config: Any, tmp_path: Any, rows: int, **options: Any):
    prompt = random_prompt(PROMPT_TOKENS, seed=5)
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS, batch_size=rows)
    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS, **options)
    cache = kvtier.TieredCache(model, cfg)
    got = reference_generate(model, prompt, cache=cache, max_new_tokens=NEW_TOKENS, **options)
    return expected, got, cache


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("beams", [1, 3])
def test_keys_and_values_match_dynamic_cache(
    kind: str, beams: int, tiny_model: Any, tmp_path: Any
) -> None:
    """Scenario: after greedy or beam-search generate, every layer's .keys/.values (gathered
    from GPU, host and disk) equal DynamicCache's; so do len, cache[i] and iteration."""
    model, config = tiny_model(kind)
    expected, got, cache = _both(model, config, tmp_path, beams, num_beams=beams)
    with cache:
        assert_same_generation(expected, got)
        assert_all_tiers_used(cache.stats())
        assert got.past_key_values is cache
        assert_same_layers(expected.past_key_values, cache)
        for index, (keys, values, window) in enumerate(cache):
            torch.testing.assert_close(keys, expected.past_key_values.layers[index].keys)
            assert (window is None) == (not cache.layers[index].is_sliding)
            assert torch.equal(cache[index][1], values)
        reference = expected.past_key_values
        assert cache.is_sliding == reference.is_sliding
        assert cache.is_initialized == reference.is_initialized
        assert cache.batch_size == beams  # DynamicCache says -1: its layers keep no batch_size
        for layer_idx in range(len(cache)):
            assert cache.get_seq_length(layer_idx) == reference.get_seq_length(layer_idx)
            assert cache.get_mask_sizes(1, layer_idx) == reference.get_mask_sizes(1, layer_idx)


def test_crop_and_reset_keep_the_surface_in_step(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: crop(-n) shortens .keys as DynamicCache's crop does; reset() empties the cache
    (keys None, not initialized) and the next generate fills it again."""
    model, config = tiny_model("llama")
    expected, got, cache = _both(model, config, tmp_path, 1)
    with cache:
        expected.past_key_values.crop(-21)
        cache.crop(-21)
        assert_same_layers(expected.past_key_values, cache)
        cache.reset()
        assert not cache.is_initialized and cache.layers[0].keys is None
        assert cache.get_seq_length() == 0
        again = reference_generate(model, random_prompt(40), cache=cache, max_new_tokens=NEW_TOKENS)
        assert cache.layers[0].keys.shape[2] == again.sequences.shape[1] - 1


def test_keys_are_a_copy_and_read_only(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: writing into what .keys returned leaves the cache unchanged; assigning .keys
    raises KVTierError; the greedy continuation is unaffected."""
    model, config = tiny_model("llama")
    expected, got, cache = _both(model, config, tmp_path, 1)
    with cache:
        keys = cache.layers[0].keys
        original = keys.clone()
        keys.zero_()
        cache.layers[0].values.fill_(7.0)
        assert torch.equal(cache.layers[0].keys, original)
        assert_same_layers(expected.past_key_values, cache)
        with pytest.raises(kvtier.KVTierError, match="read-only"):
            cache.layers[0].keys = original


def test_long_gather_warns_once(tiny_model: Any, tmp_path: Any, monkeypatch: Any) -> None:
    """Scenario: reading a layer larger than GATHER_WARN_BYTES warns once per cache."""
    model, config = tiny_model("llama")
    _, _, cache = _both(model, config, tmp_path, 1)
    monkeypatch.setattr(layer_module, "GATHER_WARN_BYTES", 1024)
    with cache:
        with pytest.warns(UserWarning, match="gathered .* GiB of tiered layer 0"):
            keys = cache.layers[0].keys
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            values = cache.layers[1].values
        assert keys.shape == values.shape


def test_batch_edits_of_a_filled_cache_name_the_alternative(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: batch_repeat_interleave / batch_select_indices on a filled TieredCache raise a
    one-line KVTierError; on an empty one they are no-ops (generate calls them so)."""
    model, config = tiny_model("llama")
    cfg = tiered_config(config, tmp_path / "store", 64)
    with kvtier.TieredCache(model, cfg) as cache:
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([0]))
        reference_generate(model, random_prompt(20), cache=cache, max_new_tokens=2)
        for edit in (
            lambda: cache.batch_repeat_interleave(2),
            lambda: cache.batch_select_indices(torch.tensor([0])),
        ):
            with pytest.raises(kvtier.KVTierError, match="filled cache") as error:
                edit()
            assert "\n" not in str(error.value)
        assert not cache.is_compileable
