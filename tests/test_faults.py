"""Faults on the tiering path: a failing disk, a forward that dies midway. Never lost or wrong K/V."""

from __future__ import annotations

import pytest
import torch

import kvtier
from kvtier.blocks import Tier
from kvtier.controller import TierController
from kvtier.layout import KVGeometry

BT = 16
LAYERS = 2


def _controller(tmp_path, *, host_blocks: int) -> TierController:
    shape = KVGeometry(
        layer_ids=(0, 1),
        layer_devices=(torch.device("cpu"),) * LAYERS,
        batch=1,
        kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        block_tokens=BT,
    )
    token_bytes = 2 * 2 * 8 * 4
    slot = BT * LAYERS * token_bytes
    cfg = kvtier.load_config(
        None,
        block_tokens=BT,
        prefill_chunk_tokens=BT,
        gpu_budget=2 * 256 * token_bytes + 4 * slot,
        host_budget=host_blocks * slot,
        disk_path=str(tmp_path),
        disk_budget=10**7,
        disk_codec="raw",
        policy_name="lru",
        policy_prefetch_depth=1,
    )
    return TierController(cfg, shape, fingerprint="faults", streaming=True)


def _step(ctl: TierController, tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = [torch.randn((2, 1, 2, tokens, 8), generator=g) for _ in range(LAYERS)]
    ctl.begin_step(tokens)
    for layer in range(LAYERS):
        ctl.append(layer, kv[layer][0], kv[layer][1])
    return kv


def test_failed_disk_write_keeps_the_block_on_host(tmp_path, monkeypatch):
    """Scenario: the disk fails while the host tier evicts; the error surfaces, no block is lost."""
    ctl = _controller(tmp_path, host_blocks=2)
    written = [_step(ctl, BT, seed) for seed in range(4)]

    def broken(*args, **kwargs):
        raise kvtier.KVTierError("disk store is full (No space left on device)")

    monkeypatch.setattr(ctl.disk.store, "write_block", broken)
    with pytest.raises(kvtier.KVTierError, match="No space left"):
        for seed in range(4, 12):
            written.append(_step(ctl, BT, seed))
    monkeypatch.undo()
    ctl.check_invariants()
    for index in range(ctl.tokens // BT):
        for layer in range(LAYERS):
            want = written[index][layer].permute(3, 0, 1, 2, 4)
            assert torch.equal(ctl.read_block(index, layer), want)


def test_forward_dying_midway_leaves_no_half_step(tmp_path):
    """Scenario: an exception between layers; the step is rolled back and the cache still works."""
    ctl = _controller(tmp_path, host_blocks=4)
    _step(ctl, BT + 3, seed=0)
    ctl.begin_step(5)
    k = torch.zeros((1, 2, 5, 8))
    ctl.append(0, k, k)  # layer 1 never comes: the forward raised
    ctl.abort_step()
    assert ctl.tokens == BT + 3
    ctl.check_invariants()
    _step(ctl, 2, seed=1)
    assert ctl.tokens == BT + 5
    assert sum(1 for b in ctl.table if Tier.GPU in b.slots or Tier.HOST in b.slots) == 2


def test_tiered_cache_rejects_a_bad_config_type(tiny_model):
    """Scenario: passing a dict as config gets a one-line KVTierError, not a deep AttributeError."""
    model, _ = tiny_model("llama")
    with pytest.raises(kvtier.KVTierError, match="kvtier.load_config"):
        kvtier.TieredCache(model, {"gpu": {"budget": "1GiB"}})
