"""`kvtier run MODEL`: a tiny checkpoint through all three tiers, token-exact; prompts, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    assert_all_tiers_used,
    needle_excerpt,
    reference_generate,
    smollm2_three_tier_sets,
    tier_budgets,
    tiny_checkpoint,
    word_prompt,
)
from transformers import AutoModelForCausalLM

from kvtier import cli, zoo
from kvtier.data import NEEDLE_QUESTION, needle_found

PROMPT_WORDS = 300
NEW_TOKENS = 12


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


def three_tier_sets(checkpoint, store, *, policy="lru"):
    """--set flags whose budgets put the run's blocks in GPU, host and disk."""
    config = AutoModelForCausalLM.from_pretrained(checkpoint).config
    budgets = tier_budgets(config, PROMPT_WORDS + NEW_TOKENS, gpu_blocks=3, host_blocks=7)
    pairs = {
        "block_tokens": 16,
        "prefill_chunk_tokens": 64,
        "gpu.budget": budgets["gpu_budget"],
        "host.budget": budgets["host_budget"],
        "disk.budget": budgets["disk_budget"],
        "disk.path": store,
        "policy.name": policy,
        "policy.sink_tokens": 16,
        "policy.recent_tokens": 32,
    }
    return [arg for key, value in pairs.items() for arg in ("--set", f"{key}={value}")]


def run(*args, input=None):
    return CliRunner().invoke(cli.main, ["run", *map(str, args)], input=input)


def test_json_is_token_exact_through_all_three_tiers(checkpoint, tmp_path):
    prompt = word_prompt(PROMPT_WORDS, seed=1)
    sets = three_tier_sets(checkpoint, tmp_path / "store")
    result = run(checkpoint, "--prompt", prompt, "--max-new-tokens", NEW_TOKENS, *sets, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("text", "token_ids", "prompt_tokens", "ttft_s", "decode_tok_s", "stats", "plan"):
        assert key in data, key
    assert data["prompt_tokens"] == PROMPT_WORDS and len(data["token_ids"]) == NEW_TOKENS
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[int(word[1:]) for word in prompt.split()]])
    expected = reference_generate(model, ids, max_new_tokens=NEW_TOKENS)
    assert data["token_ids"] == expected.sequences[0, PROMPT_WORDS:].tolist()
    assert_all_tiers_used(data["stats"])
    assert data["text"] == " ".join(f"w{i}" for i in data["token_ids"])


def test_text_streams_to_stdout_and_the_summary_to_stderr(checkpoint, tmp_path):
    sets = three_tier_sets(checkpoint, tmp_path / "store", policy="sink_recent")
    prompt = word_prompt(PROMPT_WORDS, seed=2)
    result = run(checkpoint, "--prompt", prompt, "--max-new-tokens", 4, *sets, "--show-blocks")
    assert result.exit_code == 0, result.output
    words = result.stdout.split()
    assert len(words) == 4 and all(word.startswith("w") for word in words)
    err = result.stderr
    assert "prefill: 100%" in err and f"{PROMPT_WORDS}/{PROMPT_WORDS}" in err
    for fragment in ("TIER", "gpu", "host", "disk", "time to first token", "prefix tokens reused"):
        assert fragment in err, fragment
    map_line = err.rstrip().splitlines()[-1]
    letters = map_line.split()[-1]
    assert len(letters) == -(-(PROMPT_WORDS + 4) // 16)  # one character per block
    assert letters[0] == "P" and "P" in letters[-3:] and "D" in letters  # sinks, recent, disk


def test_prompt_files_then_prompt_or_stdin(checkpoint, tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("w10 w11\n")
    second.write_text("w12\n")
    store = ["--set", f"disk.path={tmp_path / 'store'}", "--max-new-tokens", 1, "--json"]
    files = ["--prompt-file", first, "--prompt-file", second]
    data = json.loads(run(checkpoint, *files, "--prompt", "w13", *store).stdout)
    assert data["prompt_tokens"] == 4
    piped = run(checkpoint, *store, input="w10 w11 w12\n")
    assert json.loads(piped.stdout)["prompt_tokens"] == 3
    chat = json.loads(run(checkpoint, "--chat", "--prompt", "w10", *store).stdout)
    assert chat["prompt_tokens"] == 4  # w3 w10 w4 w5: the template around the message


def test_sampling_is_seeded(checkpoint, tmp_path):
    args = [checkpoint, "--prompt", word_prompt(20), "--max-new-tokens", 8, "--json"]
    args += ["--temperature", "1.5", "--set", f"disk.path={tmp_path / 'store'}"]
    first = json.loads(run(*args, "--seed", 3).stdout)["token_ids"]
    assert json.loads(run(*args, "--seed", 3).stdout)["token_ids"] == first
    assert json.loads(run(*args, "--seed", 4).stdout)["token_ids"] != first


def test_a_job_that_cannot_fit_is_refused_before_the_weights_load(checkpoint, monkeypatch):
    """Scenario (issue 10): a run the budgets cannot hold is refused at once, never after a load
    or a prefill."""

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(zoo, "load", no_weights)
    budgets = ["--set", "gpu.budget=64KiB", "--set", "host.budget=64KiB", "--set", "disk.budget=0"]
    result = run(checkpoint, "--prompt", word_prompt(50), "--max-new-tokens", 100000, *budgets)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("kvtier: error: ") and result.stderr.count("\n") == 1
    assert "cannot stream 100050 tokens" in result.stderr


def test_a_remote_that_refuses_us_is_one_line_before_the_weights_load(
    checkpoint, monkeypatch, server
):
    """Scenario: [remote] url with a password the server does not take: one line, exit 2, and
    the weights are never loaded."""

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(zoo, "load", no_weights)
    url = f"remote.url=valkey://:wrong@{server.node}"
    result = run(checkpoint, "--prompt", word_prompt(50), "--set", url)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("kvtier: error: ") and result.stderr.count("\n") == 1
    assert "remote.url" in result.stderr and "wrong" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", "w9", "--set", "gpu.budget=lots"], "gpu.budget = 'lots' is not a size"),
        (["--prompt", "w9", "--top-p", "0"], "Invalid value for '--top-p'"),
    ],
)
def test_user_errors_exit_2(checkpoint, args, fragment):
    result = run(checkpoint, *args)
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_unknown_model_and_no_chat_template_are_one_line(tmp_path, checkpoint):
    result = run("no-such-model", "--prompt", "hi")
    assert result.exit_code == 2 and "unknown model 'no-such-model'" in result.stderr
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in checkpoint.iterdir():
        if path.name != "chat_template.jinja":
            (plain / path.name).write_bytes(path.read_bytes())
    result = run(plain, "--chat", "--prompt", "w9")
    assert result.exit_code == 2 and "has no chat template; drop --chat" in result.stderr


def test_help_has_examples():
    out = CliRunner().invoke(cli.main, ["run", "--help"]).stdout
    assert "kvtier run smollm2 --chat --prompt" in out and "--show-blocks" in out


@pytest.mark.slow
def test_real_smollm2_streams_the_needle_answer_through_three_tiers(tmp_path):
    """Scenario (issue 10): `kvtier run smollm2 --prompt-file F --chat` streams a real answer,
    with progress and a summary, its KV in GPU, host and disk (fetches the model once)."""
    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text(needle_excerpt())
    sets = smollm2_three_tier_sets(1400) + ["--set", f"disk.path={tmp_path / 'store'}"]
    args = ["smollm2", "--chat", "--prompt-file", excerpt, "--prompt", NEEDLE_QUESTION]
    result = run(*args, "--max-new-tokens", 24, *sets, "--show-blocks")
    assert result.exit_code == 0, result.output
    assert needle_found(result.stdout), result.stdout
    assert "prefill: 100%" in result.stderr and "time to first token" in result.stderr
    letters = result.stderr.rstrip().splitlines()[-1].split()[-1]
    assert {"D", "H"} <= set(letters) and ("G" in letters or "P" in letters)
