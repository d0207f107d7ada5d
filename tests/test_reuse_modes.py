"""Prefix reuse under every decoding mode: a second generate() over a persisted prompt is
exact against DynamicCache in batches, beam search, sampling and prompt-lookup decoding."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    BLOCK_TOKENS,
    generation_mismatches,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
)

from kvtier.controller.index import INDEX

PROMPT = 100


@pytest.fixture(autouse=True)
def _loading_wins(monkeypatch):
    """These tests are about exactness with a reused prefix, so the cost model must load it:
    a tiny model recomputes 6 blocks about as fast as it loads them (0.0069 s each way), and
    which wins would follow the machine's load. A slow prefill makes loading win."""
    monkeypatch.setattr(INDEX, "prefill_flops", lambda fingerprint: 1e6)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["batch2", "beam", "sample", "lookup", "longer_suffix"])
def test_a_reused_prefix_is_exact_in_every_decoding_mode(kind, mode, tiny_model, tmp_path):
    model, config = tiny_model(kind)
    batch = 2 if mode == "batch2" else 1
    ids = random_prompt(PROMPT, batch_size=batch)
    kwargs = {}
    seed = None
    if mode == "beam":
        kwargs = dict(num_beams=3, num_return_sequences=2)
    elif mode == "sample":
        kwargs = dict(do_sample=True, top_k=20)
        seed = 7
    elif mode == "lookup":
        kwargs = dict(prompt_lookup_num_tokens=3)
        kwargs["output_logits"] = False
    beams = 3 if mode == "beam" else 1
    cfg = tiered_config(
        config, tmp_path / "store", PROMPT + 80, batch_size=batch * beams, disk_persist=True
    )
    tiered_generate(model, cfg, ids, seed=seed, **kwargs)  # fills the store
    second = ids
    if mode == "longer_suffix":
        second = torch.cat([ids, random_prompt(37, seed=3)], dim=1)
    expected = reference_generate(model, second, seed=seed, **kwargs)
    got, stats = tiered_generate(model, cfg, second, seed=seed, **kwargs)
    problems = (
        generation_mismatches(expected, got)
        if kwargs.get("output_logits", True)
        else ([] if torch.equal(expected.sequences, got.sequences) else ["tokens differ"])
    )
    assert not problems, (problems, stats.get("reuse"))
    assert stats["prefix_hit_tokens"] == (PROMPT // BLOCK_TOKENS) * BLOCK_TOKENS, stats.get("reuse")
