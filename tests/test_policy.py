"""Policies: ordering, pinning, and the registry (a user policy usable from TOML)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvtier
from kvtier import registry
from kvtier.blocks import BlockMeta, Tier
from kvtier.config import PolicyConfig
from kvtier.controller import TierController
from kvtier.layout import KVGeometry
from kvtier.policy import LFUPolicy, Policy, SinkRecentPolicy, make_policy, registered_policies

BT = 16


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Policies a test registers vanish after it (the registry is the one global state)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _cfg(name: str, **kw):
    return kvtier.load_config(None, policy_name=name, block_tokens=BT, **kw).policy


def _blocks() -> list[BlockMeta]:
    # index, last_access, access_count
    spec = [(0, 5, 1), (1, 2, 9), (2, 2, 3), (3, 7, 2)]
    return [BlockMeta(index=i, last_access=a, access_count=c) for i, a, c in spec]


def _indices(blocks: list[BlockMeta]) -> list[int]:
    return [b.index for b in blocks]


# -- ordering --------------------------------------------------------------------------------------
def test_lru_lfu_order():
    """Scenario: LRU evicts the least recent (ties by position); LFU the least used."""
    lru = make_policy(_cfg("lru"), BT)
    assert _indices(lru.victims(_blocks(), 4, 64)) == [1, 2, 0, 3]
    lfu = make_policy(_cfg("lfu"), BT)
    assert _indices(lfu.victims(_blocks(), 2, 64)) == [0, 3]
    assert _indices(lfu.victims(_blocks(), 4, 64)) == [0, 3, 2, 1]


def test_lfu_ties_fall_back_to_recency_then_position():
    blocks = [
        BlockMeta(index=0, last_access=4, access_count=2),
        BlockMeta(index=1, last_access=3, access_count=2),
        BlockMeta(index=2, last_access=3, access_count=2),
        BlockMeta(index=3, last_access=1, access_count=5),
    ]
    assert _indices(make_policy(_cfg("lfu"), BT).victims(blocks, 4, 64)) == [1, 2, 0, 3]


def test_victims_respect_count_and_skip_pinned_blocks():
    """Scenario: at most `count` victims; a block with pins > 0 is never one, in any policy."""
    for name in ("lru", "lfu", "sink_recent"):
        policy = make_policy(_cfg(name, policy_sink_tokens=0, policy_recent_tokens=0), BT)
        blocks = _blocks()
        blocks[1].pins = 1
        victims = policy.victims(blocks, 10, seq_tokens=64)
        assert 1 not in _indices(victims) and len(victims) == 3, name
        assert policy.victims(blocks, 0, seq_tokens=64) == []
        assert len(policy.victims(blocks, 2, seq_tokens=64)) == 2
        assert policy.victims([], 3, seq_tokens=64) == []


def test_victims_keep_the_order_of_equal_keys_stable():
    """Scenario: candidates in any order give the same victims (the key decides, not the list)."""
    lru = make_policy(_cfg("lru"), BT)
    forward = _indices(lru.victims(_blocks(), 4, 64))
    assert _indices(lru.victims(list(reversed(_blocks())), 4, 64)) == forward


# -- pinning ---------------------------------------------------------------------------------------
def test_sink_recent_pins_the_ends():
    """Scenario: the first sink_tokens and last recent_tokens never leave the GPU."""
    policy = make_policy(_cfg("sink_recent", policy_sink_tokens=16, policy_recent_tokens=16), BT)
    victims = policy.victims(_blocks(), 4, seq_tokens=64)
    assert _indices(victims) == [1, 2]  # block 0 is the sink, block 3 the recent


@pytest.mark.parametrize(
    ("sink", "recent", "seq_tokens", "pinned"),
    [
        (16, 16, 64, {0, 3}),
        (17, 16, 64, {0, 1, 3}),  # one sink token into block 1 pins it
        (0, 16, 64, {3}),
        (16, 0, 64, {0}),
        (0, 16, 60, {2, 3}),  # the recent window [44, 60) spans two blocks
        (0, 0, 60, {3}),  # the partly filled last block reaches past seq_tokens
        (0, 64, 64, {0, 1, 2, 3}),
        (32, 32, 64, {0, 1, 2, 3}),
    ],
)
def test_sink_recent_pinned_blocks(sink, recent, seq_tokens, pinned):
    policy = make_policy(
        _cfg("sink_recent", policy_sink_tokens=sink, policy_recent_tokens=recent), BT
    )
    blocks = [BlockMeta(index=i) for i in range(4)]
    assert {b.index for b in blocks if policy.pinned(b, seq_tokens)} == pinned
    victims = policy.victims(blocks, 4, seq_tokens)
    assert set(_indices(victims)) == {0, 1, 2, 3} - pinned


def test_lru_and_lfu_pin_only_by_pins():
    for name in ("lru", "lfu"):
        policy = make_policy(_cfg(name), BT)
        assert not policy.pinned(BlockMeta(index=0), 64)
        assert policy.pinned(BlockMeta(index=0, pins=2), 64)


def test_make_policy_builds_the_registered_classes():
    assert type(make_policy(_cfg("lru"), BT)) is Policy
    assert type(make_policy(_cfg("lfu"), BT)) is LFUPolicy
    policy = make_policy(_cfg("sink_recent"), 32)
    assert type(policy) is SinkRecentPolicy and policy.block_tokens == 32
    assert {"lru", "lfu", "sink_recent"} <= set(registered_policies())
    assert registered_policies() == sorted(registered_policies())


# -- registry --------------------------------------------------------------------------------------
def test_unknown_policy_lists_the_registered_ones():
    """Scenario: a typo in policy.name names the choices and how to register one."""
    with pytest.raises(kvtier.ConfigError, match="sink_recent") as info:
        kvtier.load_config(None, policy_name="lruu")
    assert "register_policy" in str(info.value)


def test_unknown_policy_lists_user_policies_too(tmp_path):
    """Scenario: the error lists every registered name, a user's own included, also from TOML."""

    @kvtier.register_policy("mine")
    class Mine(Policy):
        pass

    toml = tmp_path / "cfg.toml"
    toml.write_text('[policy]\nname = "theirs"\n')
    with pytest.raises(kvtier.ConfigError) as info:
        kvtier.load_config(toml)
    message = str(info.value)
    for name in ("lru", "lfu", "sink_recent", "mine"):
        assert name in message
    assert "theirs" in message
    with pytest.raises(kvtier.ConfigError, match="theirs"):
        make_policy(PolicyConfig("theirs", sink_tokens=0, recent_tokens=0, prefetch_depth=0), BT)


@pytest.mark.parametrize("name", ["", None])
def test_register_policy_needs_a_name(name):
    with pytest.raises(kvtier.ConfigError, match="non-empty"):
        kvtier.register_policy(name)


LAYERS = 3
TOKEN_BYTES = 2 * 1 * 2 * 8 * 4  # K and V, batch 1, 2 kv heads, head_dim 8, fp32
SLOT = BT * LAYERS * TOKEN_BYTES


def _run(toml: Path, blocks: int = 6) -> TierController:
    """`blocks` one-block steps through a controller whose GPU holds 3 slots besides staging."""
    cfg = kvtier.load_config(
        toml,
        block_tokens=BT,
        prefill_chunk_tokens=BT,
        gpu_budget=blocks * BT * TOKEN_BYTES + 3 * SLOT,  # staging: prefetch_depth 0, one buffer
        host_budget=16 * SLOT,
        disk_budget=0,
    )
    cpu = (torch.device("cpu"),) * LAYERS
    shape = KVGeometry(tuple(range(LAYERS)), cpu, 1, 2, 8, torch.float32, cfg.block_tokens)
    ctl = TierController(cfg, shape, fingerprint="p")
    for _ in range(blocks):
        for layer in range(LAYERS):
            kv = torch.randn(1, 2, BT, 8)
            ctl.append(layer, kv, kv)
    ctl.check_invariants()
    return ctl


def _on_gpu(ctl: TierController) -> set[int]:
    return {b.index for b in ctl.table if Tier.GPU in b.slots}


def test_user_policy_from_toml(tmp_path):
    """Scenario: a registered policy is selected from a TOML file and drives demotion."""

    @kvtier.register_policy("newest_first")
    class NewestFirst(Policy):
        def sort_key(self, block):
            return (-block.index,)

    assert "newest_first" in registered_policies()
    toml = tmp_path / "cfg.toml"
    toml.write_text('[policy]\nname = "newest_first"\nprefetch_depth = 0\n')
    ctl = _run(toml)
    assert type(ctl.placement.policy) is NewestFirst
    assert {0, 1} <= _on_gpu(ctl)  # the newest sealed blocks were demoted first
    ctl.close()


def test_user_victims_override_decides_demotion(tmp_path):
    """Scenario: a policy overriding `victims` (newest first) keeps the oldest blocks on the GPU,
    where LRU keeps the newest; each demotion asks the policy."""
    asked: list[list[int]] = []

    @kvtier.register_policy("mine")
    class Mine(Policy):
        def victims(self, candidates, count, seq_tokens):
            asked.append(_indices(candidates))
            return sorted(candidates, key=lambda b: -b.index)[:count]

    toml = tmp_path / "mine.toml"
    toml.write_text('[policy]\nname = "mine"\nprefetch_depth = 0\n')
    mine = _run(toml)
    assert asked, "the controller never asked the policy for a victim"
    toml.write_text('[policy]\nname = "lru"\nprefetch_depth = 0\n')
    lru = _run(toml)
    assert 0 in _on_gpu(mine) and 0 not in _on_gpu(lru)
    assert max(_on_gpu(lru)) == 5 and max(_on_gpu(mine)) == 5  # the open step's block stays
    mine.close()
    lru.close()


def test_user_pinned_override_keeps_blocks_on_the_gpu(tmp_path):
    """Scenario: a policy pinning block 1 (by `pinned`) never gets it demoted by the controller."""

    @kvtier.register_policy("pin_one")
    class PinOne(Policy):
        def pinned(self, block, seq_tokens):
            return block.index == 1 or super().pinned(block, seq_tokens)

    toml = tmp_path / "pin.toml"
    toml.write_text('[policy]\nname = "pin_one"\nprefetch_depth = 0\n')
    ctl = _run(toml)
    assert 1 in _on_gpu(ctl) and 0 not in _on_gpu(ctl)
    ctl.close()
