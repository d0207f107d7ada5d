"""Policies: ordering, pinning, and the registry (a user policy usable from TOML)."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.blocks import BlockMeta, Tier
from kvtier.controller import KVShape, TierController
from kvtier.policy import Policy, make_policy, registered_policies


def _cfg(name: str, **kw):
    return kvtier.load_config(None, policy_name=name, block_tokens=16, **kw).policy


def _blocks() -> list[BlockMeta]:
    # index, last_access, access_count
    spec = [(0, 5, 1), (1, 2, 9), (2, 2, 3), (3, 7, 2)]
    return [BlockMeta(index=i, last_access=a, access_count=c) for i, a, c in spec]


def test_lru_lfu_order():
    """Scenario: LRU evicts the least recent (ties by position); LFU the least used."""
    lru = make_policy(_cfg("lru"), 16)
    assert [b.index for b in lru.victims(_blocks(), 4, 64)] == [1, 2, 0, 3]
    lfu = make_policy(_cfg("lfu"), 16)
    assert [b.index for b in lfu.victims(_blocks(), 2, 64)] == [0, 3]


def test_sink_recent_pins_the_ends():
    """Scenario: the first sink_tokens and last recent_tokens never leave the GPU."""
    policy = make_policy(_cfg("sink_recent", policy_sink_tokens=16, policy_recent_tokens=16), 16)
    victims = policy.victims(_blocks(), 4, seq_tokens=64)
    assert [b.index for b in victims] == [1, 2]  # block 0 is the sink, block 3 the recent


def test_user_policy_from_toml(tmp_path):
    """Scenario: a registered policy is selected from a TOML file and drives demotion."""

    @kvtier.register_policy("newest_first")
    class NewestFirst(Policy):
        def sort_key(self, block):
            return (-block.index,)

    assert "newest_first" in registered_policies()
    toml = tmp_path / "cfg.toml"
    toml.write_text('[policy]\nname = "newest_first"\nprefetch_depth = 0\n')
    token_bytes = 2 * 2 * 8 * 4
    slot = 16 * token_bytes
    cfg = kvtier.load_config(
        toml,
        block_tokens=16,
        prefill_chunk_tokens=16,
        gpu_budget=96 * token_bytes + 3 * slot,
        host_budget=8 * slot,
        disk_budget=0,
    )
    shape = KVShape((0,), (torch.device("cpu"),), 1, 2, 8, torch.float32)
    ctl = TierController(cfg, shape, fingerprint="p")
    for _ in range(5):
        ctl.begin_step(16)
        kv = torch.randn(1, 2, 16, 8)
        ctl.append(0, kv, kv)
    on_gpu = sorted(b.index for b in ctl.table if Tier.GPU in b.slots)
    assert 0 in on_gpu and 1 in on_gpu  # the newest sealed blocks were demoted first
    ctl.check_invariants()


def test_unknown_policy_lists_the_registered_ones():
    """Scenario: a typo in policy.name names the choices and how to register one."""
    with pytest.raises(kvtier.ConfigError, match="sink_recent") as info:
        kvtier.load_config(None, policy_name="lruu")
    assert "register_policy" in str(info.value)
