"""kvtier/demo/: both demos reach all three tiers, match DynamicCache, and report it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_all_tiers_used

from kvtier.demo import TinyDemoResult, format_demo, format_tiny_demo, run_demo, run_tiny_demo
from kvtier.errors import ConfigError


@pytest.mark.slow
def test_demo_matches_and_uses_every_tier(tmp_path: Path) -> None:
    """Scenario: a 600-token demo with a kept store and JSON output: tokens match, all tiers used."""
    store = tmp_path / "store"
    json_path = tmp_path / "demo.json"

    result = run_tiny_demo(
        prompt_tokens=600, new_tokens=8, seed=1, store=str(store), json_path=str(json_path)
    )

    assert isinstance(result, TinyDemoResult)
    assert result.tokens_match, f"first mismatch at new token {result.first_mismatch}"
    assert_all_tiers_used(result.stats)
    assert store.is_dir(), "a store the caller named is kept"
    saved = json.loads(json_path.read_text())
    assert saved["tokens_match"] is True
    assert saved["stats"]["disk"]["blocks"] == result.stats["disk"]["blocks"]
    table = format_tiny_demo(result)
    assert "tokens match: yes" in table
    assert all(tier in table for tier in ("gpu", "host", "disk"))


def test_demo_refuses_a_prompt_too_short_for_disk() -> None:
    """Scenario: a prompt that fits in GPU + host gets a ConfigError naming the shortest that works."""
    with pytest.raises(ConfigError, match="at least"):
        run_tiny_demo(prompt_tokens=100, new_tokens=4)


def test_format_tiny_demo_renders_tiers_speeds_and_verdict() -> None:
    """Scenario: format_demo shows blocks and bytes per tier, both tok/s and the verdict."""
    tier = {"blocks": 3, "bytes_used": 3 << 20, "bytes_written": 1536, "bytes_read": 0}
    result = TinyDemoResult(
        tokens_match=False,
        first_mismatch=5,
        prompt_tokens=3000,
        new_tokens=32,
        reference_prefill_s=1.5,
        kvtier_prefill_s=2.25,
        reference_tok_s=123.45,
        kvtier_tok_s=67.8,
        seconds=12.3,
        budgets={"gpu_budget": 1, "host_budget": 2, "disk_budget": 3},
        stats={"gpu": tier, "host": tier, "disk": tier},
    )

    table = format_tiny_demo(result)

    assert "3.00 MiB" in table and "1.50 KiB" in table and "0 B" in table
    assert "123.5" in table and "67.8" in table and "2.25" in table
    assert "tokens match: no (first difference at new token 5)" in table


@pytest.mark.slow
def test_real_demo_answers_from_three_tiers_like_dynamic_cache(tmp_path: Path) -> None:
    """Scenario (issue 10): SmolLM2 finds the passphrase with its KV in GPU, host and disk, token
    for token what DynamicCache answers (fetches the model once per machine)."""
    result = run_demo(store=tmp_path / "store", json_path=tmp_path / "demo.json")

    assert result.tokens_match, (result.reference["text"], result.kvtier["text"])
    assert result.found, result.kvtier["text"]
    assert_all_tiers_used(result.stats)
    assert set(result.block_map) <= set("PGHD") and "D" in result.block_map
    assert len(result.block_map) == result.stats["blocks"]
    text = format_demo(result)
    assert "tokens match: yes" in text and "Amber Falcon 42" in text
    assert json.loads((tmp_path / "demo.json").read_text())["found"] is True
