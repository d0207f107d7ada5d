"""The presets in configs/: each documented, valid, loaded, and run through all three tiers.

A preset's sizes are for real models; the runs keep its other choices (policy and its settings,
codec, persistence, prefetch depth) and shrink the budgets so a tiny model reaches the disk.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    BLOCK_TOKENS,
    assert_all_tiers_used,
    assert_same_generation,
    random_prompt,
    reference_generate,
    tier_budgets,
    tiered_generate,
)

import kvtier
from kvtier import cli, registry
from kvtier.blocks import BlockMeta
from kvtier.config import load_config, to_toml
from kvtier.layout import (
    MIN_GPU_BLOCKS,
    KVGeometry,
    min_gpu_bytes,
    resident_gpu_bytes,
    staging_bytes,
)
from kvtier.policy import make_policy

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = ["low-vram", "max-context", "persistent-prefix", "custom-policy"]
MIB = 2**20


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    """No KVTIER_* variables, HOME in tmp_path (the presets' stores), a private policy registry
    and custom_policy imported afresh by each test."""
    for name in list(os.environ):
        if name.startswith("KVTIER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.delitem(sys.modules, "custom_policy", raising=False)


def preset(name: str) -> Path:
    return CONFIGS / f"{name}.toml"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_documented_valid_and_round_trips(name, tmp_path):
    """Scenario: a header says when to use it; `config validate` passes; show loads back."""
    text = preset(name).read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 5, f"{name}.toml needs a header comment saying when to use it"
    assert tomllib.loads(text), "a preset sets something"
    result = CliRunner().invoke(cli.main, ["config", "validate", str(preset(name))])
    assert result.exit_code == 0, result.output
    cfg = load_config(preset(name))
    shown = tmp_path / "shown.toml"
    shown.write_text(to_toml(cfg))
    assert load_config(shown) == cfg


def test_low_vram_budget_is_the_smallest_that_streams_efficiently():
    """Scenario: for the header's reference model at 32k tokens, 512 MiB holds the staging ring
    of prefetch_depth 1, the pinned sink/recent blocks, 2 spare slots and the open block, and
    is within twice that; ~60k tokens still stream, 64k need more."""
    cfg = load_config(preset("low-vram"))
    assert cfg.policy.prefetch_depth == 1  # 0 waits on every copy; 2 costs a staging buffer
    assert cfg.block_tokens == 256
    cpu = torch.device("cpu")
    geometry = KVGeometry(tuple(range(32)), (cpu,) * 32, 1, 8, 128, torch.bfloat16, 256)
    assert geometry.block_bytes == 32 * MIB
    buffers = cfg.policy.prefetch_depth + 1
    pinned = make_policy(cfg.policy, cfg.block_tokens).max_pinned_blocks()
    assert pinned == 2

    def minimum(tokens: int) -> int:
        return min_gpu_bytes(geometry, buffers=buffers, tokens=tokens)

    assert staging_bytes(geometry, 32768, buffers=buffers) == 256 * MIB  # as the header says
    assert minimum(32768) == 288 * MIB
    slots = (cfg.gpu.budget_bytes - staging_bytes(geometry, 32768, buffers=buffers)) // (
        geometry.block_bytes
    )
    assert slots == 8
    efficient = staging_bytes(geometry, 32768, buffers=buffers) + (pinned + 2 + 1) * 32 * MIB
    assert efficient <= cfg.gpu.budget_bytes <= 2 * efficient
    assert minimum(60 * 1024) <= cfg.gpu.budget_bytes < minimum(65536)
    assert resident_gpu_bytes(geometry, 32768) > cfg.gpu.budget_bytes  # it streams


def test_max_context_is_host_and_disk_heavy():
    cfg, defaults = load_config(preset("max-context")), load_config()
    assert cfg.host.budget_bytes > defaults.host.budget_bytes
    assert cfg.disk.budget_bytes > defaults.disk.budget_bytes
    assert cfg.specs["host.budget"] == "70%" and cfg.specs["disk.budget"] == "90%"
    assert cfg.disk.codec == "shuffle+lz4" and cfg.policy.prefetch_depth == 1


def test_persistent_prefix_persists_and_pins_the_prefix():
    cfg = load_config(preset("persistent-prefix"))
    assert cfg.disk.persist and cfg.disk.budget_bytes > 0
    assert cfg.disk.path == Path(os.environ["HOME"]) / ".cache" / "kvtier" / "persistent-prefix"
    policy = make_policy(cfg.policy, cfg.block_tokens)
    prefix_blocks = math.ceil(cfg.policy.sink_tokens / cfg.block_tokens)
    long_context = 100 * cfg.block_tokens
    pinned = [i for i in range(100) if policy.pinned(BlockMeta(index=i), long_context)]
    assert pinned[:prefix_blocks] == list(range(prefix_blocks)) and prefix_blocks == 8


# --- each preset run through GPU, host and disk on a tiny model ----------------------------------

PROMPT_TOKENS, NEW_TOKENS = 200, 8


def _shrunk(name: str, model_config: Any, store: Path) -> kvtier.Config:
    """The preset with sizes for a tiny model: 16-token blocks, small chunk and windows, and
    budgets that leave the pinned blocks and one more on the GPU, 4 blocks on host and the
    rest on disk."""
    small = {
        "block_tokens": BLOCK_TOKENS,
        "prefill_chunk_tokens": 32,
        "disk_path": str(store),
        "policy_sink_tokens": 16,
        "policy_recent_tokens": 16,
    }
    cfg = load_config(preset(name), **small)
    if cfg.policy.name == "middle_out":
        cfg = cfg.with_overrides(policy={"middle_out": {"edge_blocks": 1}})
    pinned = make_policy(cfg.policy, BLOCK_TOKENS).max_pinned_blocks()
    gpu_blocks = MIN_GPU_BLOCKS + pinned  # the pinned blocks fit: the policy decides the rest
    budgets = tier_budgets(
        model_config,
        PROMPT_TOKENS + NEW_TOKENS,
        gpu_blocks=gpu_blocks,
        host_blocks=4,
        prefetch_depth=cfg.policy.prefetch_depth,
    )
    return cfg.with_overrides(**budgets)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_through_all_tiers_token_for_token(name, tiny_model, tmp_path):
    """Scenario: greedy generate with each preset's policy, codec and persistence equals
    DynamicCache, with blocks on GPU, host and disk."""
    model, model_config = tiny_model("llama")
    cfg = _shrunk(name, model_config, tmp_path / "store")
    prompt = random_prompt(PROMPT_TOKENS)
    expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW_TOKENS)
    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)
    files = list((tmp_path / "store").rglob("*.safetensors"))
    assert bool(files) == cfg.disk.persist  # persist keeps the disk blocks after close
