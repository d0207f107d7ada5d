"""`kvtier verify MODEL`: DynamicCache against kvtier through every tier; a broken cache fails."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from conftest import needle_excerpt, tiny_checkpoint, word_prompt

from kvtier import cli
from kvtier.controller.controller import TierController


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path, request):
    """A clean KVTIER_* environment; no saved bench results, except for the real-model (slow)
    tests, which need the user cache that holds the fetched model."""
    for name in list(os.environ):
        if name.startswith("KVTIER_"):
            monkeypatch.delenv(name)
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def verify(checkpoint, tmp_path, *args):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(word_prompt(300, seed=5))
    store = ["--set", f"disk.path={tmp_path / 'store'}"]
    command = ["verify", str(checkpoint), "--prompt-file", str(prompt), *store, *args]
    return CliRunner().invoke(cli.main, command)


def test_tokens_and_logits_match_with_every_tier_used(checkpoint, tmp_path):
    result = verify(checkpoint, tmp_path, "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "tokens match DynamicCache: yes (8 of 8)" in out
    assert "every tier held blocks and disk was read back: yes" in out
    data = json.loads(verify(checkpoint, tmp_path, "--max-new-tokens", "8", "--json").stdout)
    assert data["tokens_match"] and data["max_logit_diff"] <= 1e-5  # fp32 on CPU, DESIGN.md
    assert data["compared_steps"] == 8 and data["block_tokens"] == 16
    assert all(data["stats"][tier]["blocks"] > 0 for tier in ("gpu", "host", "disk"))


def test_a_cache_that_returns_wrong_kv_fails_with_exit_1(checkpoint, tmp_path, monkeypatch):
    """Scenario: the check must be able to fail: K/V perturbed on the way to attention."""
    append = TierController.append

    def perturbed(self, tiered_index, keys, values):
        k, v = append(self, tiered_index, keys, values)
        return k, v + 0.05

    monkeypatch.setattr(TierController, "append", perturbed)
    result = verify(checkpoint, tmp_path, "--max-new-tokens", "8", "--json")
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["max_logit_diff"] > 1e-3


def test_a_prompt_too_short_for_three_tiers_is_one_line(checkpoint, tmp_path):
    prompt = tmp_path / "short.txt"
    prompt.write_text("w10 w11 w12")
    command = ["verify", str(checkpoint), "--prompt-file", str(prompt), "--max-new-tokens", "2"]
    result = CliRunner().invoke(cli.main, command)
    assert result.exit_code == 2 and "verify needs at least 96 tokens" in result.stderr


def test_help_has_examples():
    out = CliRunner().invoke(cli.main, ["verify", "--help"]).stdout
    assert "kvtier verify smollm2" in out and "--prompt-file long.txt" in out


@pytest.mark.slow
def test_real_smollm2_matches_dynamic_cache_through_every_tier(tmp_path):
    """Scenario (issue 10): the check a user runs on a real model (fetched once per machine)."""
    prompt = tmp_path / "excerpt.txt"
    prompt.write_text(needle_excerpt(paragraphs=4))
    command = ["verify", "smollm2", "--prompt-file", str(prompt), "--max-new-tokens", "8"]
    command += ["--set", f"disk.path={tmp_path / 'store'}", "--json"]
    result = CliRunner().invoke(cli.main, command)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens_match"] and data["every_tier_used"], data
    assert data["max_logit_diff"] < 1e-3, data["max_logit_diff"]  # fp32 on CPU
