"""Faults on the tiering path: a failing disk, a forward that dies midway. Never lost or wrong K/V."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import (
    assert_same_generation,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
)

import kvtier
from kvtier import cli
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


def _disk_fails_after(monkeypatch, writes: int, number: int) -> list[int]:
    """Every block file write after the first `writes` raises OSError(`number`), as a disk that
    fills up (ENOSPC) or turns read-only (EROFS) mid-run does; the count of writes tried."""
    from kvtier.tiers.disk import files

    original, tried = files._write_all, [0]

    def failing(fd, buffer):
        tried[0] += 1
        if tried[0] > writes:
            raise OSError(number, os.strerror(number))
        return original(fd, buffer)

    monkeypatch.setattr(files, "_write_all", failing)
    return tried


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EROFS], ids=["full", "read-only"])
def test_a_disk_failing_mid_generate_stops_with_one_line(number, tiny_model, tmp_path, monkeypatch):
    """Scenario: the KV streams through disk (one host block) and the disk fills up or turns
    read-only mid-run: generate stops with one KVTierError line naming the cause, the cache stays
    consistent, close() does not raise, and the files written before still verify."""
    model, config = tiny_model("llama")
    ids = random_prompt(200)
    cfg = tiered_config(config, tmp_path / "store", 240, host_blocks=1, disk_persist=True)
    tried = _disk_fails_after(monkeypatch, 6, number)
    cache = kvtier.TieredCache(model, cfg)
    try:
        with pytest.raises(kvtier.KVTierError) as raised:
            model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
        assert tried[0] > 6 and "\n" not in str(raised.value)
        assert os.strerror(number) in str(raised.value), str(raised.value)
        cache.controller.check_invariants()
    finally:
        cache.close()  # never raises
    monkeypatch.undo()
    verified = CliRunner().invoke(cli.main, ["store", "verify", str(tmp_path / "store")])
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EROFS], ids=["full", "read-only"])
def test_a_failing_persist_write_is_a_warning_and_generation_goes_on(
    number, tiny_model, tmp_path, monkeypatch
):
    """Scenario: the KV fits in memory and only persist writes it through to disk; the disk
    fails mid-run: generation finishes token-exact and the failed saves are counted."""
    model, config = tiny_model("llama")
    ids = random_prompt(200)
    cfg = tiered_config(
        config, tmp_path / "store", 240, gpu_blocks=16, host_blocks=16, disk_persist=True
    )
    _disk_fails_after(monkeypatch, 4, number)
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    assert stats["persist"]["failed"] > 0, stats["persist"]
