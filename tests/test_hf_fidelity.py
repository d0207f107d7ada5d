"""Fidelity: generate() through kvtier.TieredCache equals HF's DynamicCache, tokens and logits.

fp32 on CPU, max abs logit diff <= 1e-5, budgets that put blocks on GPU, host and disk (DESIGN.md 9).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import (
    KINDS,
    assert_all_tiers_used,
    assert_same_generation,
    generation_mismatches,
    hook_ids,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
    tiered_layer_count,
)
from transformers import DynamicCache, T5Config, T5ForConditionalGeneration

import kvtier

PROMPT_TOKENS = 360  # > 5 sliding windows of mistral_sliding (64) and 11 of gemma3 (32)
NEW_TOKENS = 20


def _check_tiers(config: Any, stats: dict[str, Any]) -> None:
    if tiered_layer_count(config) > 0:
        assert_all_tiers_used(stats)
    else:  # all sliding (mistral_sliding): the bounded windows stay on the device, untiered
        assert [stats[tier]["blocks"] for tier in ("gpu", "host", "disk")] == [0, 0, 0], stats
        assert stats["disk"]["bytes_written"] == 0, stats


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_dynamic_cache(kind: str, tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: greedy decode of a 360-token prompt with the KV spread over GPU, host and disk."""
    model, config = tiny_model(kind)
    prompt = random_prompt(PROMPT_TOKENS)
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS)

    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW_TOKENS)

    assert_same_generation(expected, got)
    _check_tiers(config, stats)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("policy_name", "disk_codec"), [("lfu", "raw"), ("sink_recent", "shuffle+lz4")]
)
def test_greedy_other_policies_and_codecs(
    policy_name: str, disk_codec: str, tiny_model: Any, tmp_path: Any
) -> None:
    """Scenario: greedy Llama through all tiers with policy lfu / sink_recent, codec raw / shuffle+lz4."""
    model, config = tiny_model("llama")
    prompt = random_prompt(PROMPT_TOKENS, seed=1)
    cfg = tiered_config(
        config,
        tmp_path / "store",
        PROMPT_TOKENS + NEW_TOKENS,
        policy_name=policy_name,
        disk_codec=disk_codec,
    )

    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW_TOKENS)

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


@pytest.mark.slow
def test_prefill_chunk_sealing_more_blocks_than_host_holds(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: each 128-token prefill chunk seals 8 blocks at once into a 6-block host tier."""
    model, config = tiny_model("llama")
    prompt = random_prompt(PROMPT_TOKENS, seed=11)
    cfg = tiered_config(
        config,
        tmp_path / "store",
        PROMPT_TOKENS + NEW_TOKENS,
        host_blocks=6,
        prefill_chunk_tokens=128,
    )

    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW_TOKENS)

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


@pytest.mark.slow
def test_batch_of_two_with_left_padding(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: batch of 2 Llama prompts, the second left-padded by 45 tokens, greedy through all tiers."""
    model, config = tiny_model("llama")
    prompt = random_prompt(320, batch_size=2, seed=2)
    attention_mask = torch.ones_like(prompt)
    prompt[1, :45] = config.pad_token_id
    attention_mask[1, :45] = 0
    cfg = tiered_config(config, tmp_path / "store", 320 + NEW_TOKENS, batch_size=2)

    expected = reference_generate(
        model, prompt, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS
    )
    got, stats = tiered_generate(
        model, cfg, prompt, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS
    )

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


@pytest.mark.slow
def test_beam_search(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: beam search (3 beams, reorder_cache every step) on Llama through all tiers."""
    model, config = tiny_model("llama")
    prompt = random_prompt(300, seed=3)
    new_tokens = 16
    cfg = tiered_config(config, tmp_path / "store", 300 + new_tokens, batch_size=3)

    expected = reference_generate(model, prompt, num_beams=3, max_new_tokens=new_tokens)
    got, stats = tiered_generate(model, cfg, prompt, num_beams=3, max_new_tokens=new_tokens)

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


@pytest.mark.slow
def test_sampling_with_fixed_seed(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: top-k sampling with torch seeded identically before each run gives identical tokens."""
    model, config = tiny_model("llama")
    prompt = random_prompt(PROMPT_TOKENS, seed=4)
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS)
    sampling = {"do_sample": True, "top_k": 50, "max_new_tokens": NEW_TOKENS, "seed": 1234}

    expected = reference_generate(model, prompt, **sampling)
    got, stats = tiered_generate(model, cfg, prompt, **sampling)

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


class _CropRecordingCache(DynamicCache):
    """DynamicCache that remembers the argument of every crop() call."""

    def __init__(self, config: Any) -> None:
        super().__init__(config=config)
        self.crops: list[int] = []

    def crop(self, tokens_to_remove: int) -> None:
        self.crops.append(tokens_to_remove)
        super().crop(tokens_to_remove)


@pytest.mark.slow
def test_prompt_lookup_decoding_crops(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: prompt-lookup (assisted) decoding on a repetitive prompt: rejected drafts are cropped."""
    model, config = tiny_model("llama")
    prompt = random_prompt(24, seed=5).repeat(1, 14)  # 336 tokens: 14 copies of one phrase
    new_tokens = 24
    cfg = tiered_config(config, tmp_path / "store", prompt.shape[1] + new_tokens + 4)
    lookup = {"prompt_lookup_num_tokens": 4, "max_new_tokens": new_tokens}

    recorder = _CropRecordingCache(config)
    expected = reference_generate(model, prompt, cache=recorder, **lookup)
    assert any(n < 0 for n in recorder.crops), (
        "the reference never rejected a draft: no crop tested"
    )
    got, stats = tiered_generate(model, cfg, prompt, **lookup)

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


def _forward(model: Any, cache: Any, tokens: torch.Tensor) -> torch.Tensor:
    """One forward of `tokens` [1, n] through `cache`; the logits of its last position [1, vocab]."""
    with torch.no_grad():
        output = model(input_ids=tokens, past_key_values=cache, use_cache=True)
    return output.logits[:, -1, :]


def _drive(model: Any, cache: Any, prompt: torch.Tensor, extra: torch.Tensor) -> list[Any]:
    """Prefill 200 tokens, decode 10 one by one, crop(-20), then feed 4 at once and 8 one by one.

    Returns the logits and get_seq_length() after every forward. With 16-token blocks the crop
    goes back from 210 to 190 tokens: into block 11 (176..191), sealed since the prefill.
    """
    trace = [(_forward(model, cache, prompt[:, :200]), cache.get_seq_length())]
    for position in range(200, 210):
        trace.append(
            (_forward(model, cache, prompt[:, position : position + 1]), cache.get_seq_length())
        )
    cache.crop(-20)
    trace.append((None, cache.get_seq_length()))
    trace.append((_forward(model, cache, extra[:, :4]), cache.get_seq_length()))
    for position in range(4, 12):
        trace.append(
            (_forward(model, cache, extra[:, position : position + 1]), cache.get_seq_length())
        )
    return trace


def _assert_same_trace(expected: list[Any], got: list[Any], atol: float = 1e-5) -> None:
    assert len(expected) == len(got)
    for step, ((want_logits, want_length), (logits, length)) in enumerate(
        zip(expected, got, strict=True)
    ):
        assert length == want_length, (
            f"step {step}: get_seq_length {length}, expected {want_length}"
        )
        if want_logits is not None:
            diff = (want_logits - logits).abs().max().item()
            assert diff <= atol, (
                f"step {step} (seq length {want_length}): max abs logit diff {diff:.3g}"
            )


def test_crop_into_sealed_block_then_continue(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: forward loop, crop(-20) into a sealed block, continue: logits equal DynamicCache's."""
    model, config = tiny_model("llama")
    prompt = random_prompt(210, seed=6)
    extra = random_prompt(12, seed=7)
    cfg = tiered_config(config, tmp_path / "store", 210, host_blocks=5)

    expected = _drive(model, DynamicCache(config=config), prompt, extra)
    cache = kvtier.TieredCache(model, cfg)
    try:
        got = _drive(model, cache, prompt, extra)
        stats = cache.stats()
    finally:
        cache.close()

    assert expected[-1][1] == 190 + 12
    _assert_same_trace(expected, got)
    assert_all_tiers_used(stats)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_forward_loop_token_by_token(kind: str, tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: no generate(): prefill by forward, then greedy token-by-token forwards; logits and
    get_seq_length (every layer) equal DynamicCache's at each step."""
    model, config = tiny_model(kind)
    prompt = random_prompt(300, seed=8)
    steps = 12
    cfg = tiered_config(config, tmp_path / "store", 300 + steps)

    def run(cache: Any) -> list[Any]:
        logits = _forward(model, cache, prompt)
        trace = [(logits, [cache.get_seq_length(i) for i in range(config.num_hidden_layers)])]
        for _ in range(steps):
            logits = _forward(model, cache, logits.argmax(-1, keepdim=True))
            trace.append(
                (logits, [cache.get_seq_length(i) for i in range(config.num_hidden_layers)])
            )
        return trace

    expected = run(DynamicCache(config=config))
    cache = kvtier.TieredCache(model, cfg)
    try:
        got = run(cache)
        stats = cache.stats()
    finally:
        cache.close()

    assert expected[-1][1][0] == 300 + steps
    _assert_same_trace(expected, got)
    assert_all_tiers_used(stats)


@pytest.mark.parametrize("kind", ["llama", "mistral_sliding", "gemma3"])
def test_mask_sizes_and_query_offset(kind: str, tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: after a 150-token prefill and one decode step, get_mask_sizes(q, layer) and
    get_query_offset(layer) equal DynamicCache's for every layer, sliding ones included."""
    model, config = tiny_model(kind)
    prompt = random_prompt(151, seed=9)
    cfg = tiered_config(config, tmp_path / "store", 151)

    def sizes(cache: Any) -> list[Any]:
        found = []
        for chunk in (prompt[:, :150], prompt[:, 150:]):
            _forward(model, cache, chunk)
            for layer in range(config.num_hidden_layers):
                found.append(
                    (
                        layer,
                        cache.get_seq_length(),
                        [cache.get_mask_sizes(q, layer) for q in (1, 7)],
                        cache.get_query_offset(layer),
                    )
                )
        return found

    expected = sizes(DynamicCache(config=config))
    cache = kvtier.TieredCache(model, cfg)
    try:
        got = sizes(cache)
    finally:
        cache.close()

    assert got == expected


def test_close_removes_hooks(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: TieredCache(model) hooks the model; close() puts every hook back as it was."""
    model, config = tiny_model("llama")
    before = hook_ids(model)

    cache = kvtier.TieredCache(model, tiered_config(config, tmp_path / "store", 64))
    hooked = hook_ids(model)
    cache.close()

    assert hooked != before
    assert hook_ids(model) == before


def test_encoder_decoder_is_refused(tmp_path: Any) -> None:
    """Scenario: a T5 (encoder-decoder) model raises UnsupportedModelError naming its model type."""
    config = T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config).eval()
    cfg = kvtier.load_config(
        None,
        block_tokens=16,
        gpu_budget=1 << 20,
        host_budget=1 << 20,
        disk_path=str(tmp_path / "store"),
        disk_budget=64 << 20,
    )

    with pytest.raises(kvtier.UnsupportedModelError, match="(?i)t5"):
        kvtier.TieredCache(model, cfg)


class _NoisyCache(DynamicCache):
    """DynamicCache that adds 1e-2 noise to one layer's cached V once, when it reaches `at_tokens`."""

    def __init__(self, config: Any, *, layer_idx: int, at_tokens: int) -> None:
        super().__init__(config=config)
        self.layer_idx, self.at_tokens, self.done = layer_idx, at_tokens, False

    def update(
        self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any
    ) -> Any:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if (
            layer_idx == self.layer_idx
            and not self.done
            and layer.get_seq_length() >= self.at_tokens
        ):
            noise = torch.randn(layer.values.shape, generator=torch.Generator().manual_seed(0))
            layer.values.add_(1e-2 * noise)  # `values` may be this tensor: this step sees it too
            self.done = True
        return keys, values


@pytest.mark.parametrize("kind", KINDS)
def test_fidelity_check_catches_perturbed_kv(kind: str, tiny_model: Any) -> None:
    """Scenario: the harness can fail: 1e-2 noise on one layer's cached V mid-generation is reported."""
    model, config = tiny_model(kind)
    prompt = random_prompt(PROMPT_TOKENS)
    layer_idx = 1  # full attention in every kind (gemma3: layers 1, 3, 5)

    exact = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    again = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    noisy_cache = _NoisyCache(config, layer_idx=layer_idx, at_tokens=PROMPT_TOKENS + 5)
    noisy = reference_generate(model, prompt, cache=noisy_cache, max_new_tokens=NEW_TOKENS)

    assert generation_mismatches(exact, again) == []  # DynamicCache against itself: exact
    assert noisy_cache.done
    problems = generation_mismatches(exact, noisy)
    assert problems, "1e-2 noise on V went unnoticed: the fidelity tests could not fail"


@pytest.mark.gpu
def test_greedy_matches_dynamic_cache_on_cuda(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: greedy Llama on CUDA (streams, pinned host) through all tiers equals DynamicCache."""
    shared, config = tiny_model("llama")
    model = copy.deepcopy(shared).to("cuda")
    prompt = random_prompt(PROMPT_TOKENS).to("cuda")
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS)

    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW_TOKENS)

    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


# -- in place: the sequence fits the GPU budget whole, attention reads the slots directly -----------
def _in_place_config(config: Any, store: Any, gpu_tokens: int, **overrides: Any) -> kvtier.Config:
    """A config whose GPU budget holds exactly `gpu_tokens` positions in blocks, nothing more."""
    from conftest import BLOCK_TOKENS, geometry

    kv = geometry(config)
    blocks = -(-gpu_tokens // BLOCK_TOKENS)
    return kvtier.load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=64,
        gpu_budget=blocks * kv.block_bytes,
        host_budget=64 * kv.block_bytes,
        disk_path=str(store),
        disk_budget=0,
        policy_name="lru",
        **overrides,
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_in_place_when_the_sequence_fits(kind: str, tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: everything fits the GPU budget: no staging, no gather copy, exact logits."""
    model, config = tiny_model(kind)
    prompt = random_prompt(PROMPT_TOKENS, seed=21)
    cfg = _in_place_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS)

    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW_TOKENS)

    assert_same_generation(expected, got)
    assert stats["gpu"]["staging_bytes"] == 0, stats["gpu"]
    assert stats["timings"]["gathers"] == 0 and stats["timings"]["sync_gathers"] == 0
    assert stats["gpu"]["blocks"] == stats["blocks"] > 0


@pytest.mark.slow
def test_in_place_then_streamed_once_the_gpu_is_outgrown(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: the prompt fits the GPU whole, decode outgrows it: the cache switches to
    streaming layers through staging mid-generation and the tokens stay exact."""
    model, config = tiny_model("llama")
    prompt = random_prompt(200, seed=22)
    new_tokens = 120
    cfg = _in_place_config(config, tmp_path / "store", 240)

    expected = reference_generate(model, prompt, max_new_tokens=new_tokens)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=new_tokens)

    assert_same_generation(expected, got)
    assert stats["gpu"]["staging_bytes"] > 0 and stats["host"]["blocks"] > 0, stats
    assert stats["timings"]["gathers"] > 0
