"""GPU-only checks (CUDA streams, pinned host slabs); every path here also runs on CPU elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_prompt, reference_generate, tiered_config, tiered_generate

import kvtier
from kvtier.blocks import Tier
from kvtier.transfer import Lane, Mover

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral_sliding", "gemma3"])
def test_tiny_matrix_on_gpu(tiny_model, tmp_path, kind, dtype):
    """Scenario: the tiny-model fidelity matrix on CUDA with copy streams, in fp32 and bf16."""
    model, config = tiny_model(kind)
    model = copy.deepcopy(model).to("cuda", dtype)
    ids = random_prompt(300).cuda()
    expected = reference_generate(model, ids, max_new_tokens=16)
    cfg = tiered_config(config, tmp_path, 316, gpu_blocks=6, host_blocks=8)
    if dtype == torch.bfloat16:  # budgets were sized for fp32 blocks
        cfg = cfg.with_overrides(
            gpu_budget=cfg.gpu.budget_bytes // 2, host_budget=cfg.host.budget_bytes // 2
        )
    got, stats = tiered_generate(model, cfg, ids, max_new_tokens=16)
    assert torch.equal(expected.sequences, got.sequences)
    atol = 1e-4 if dtype == torch.float32 else 0.05
    diff = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(expected.logits, got.logits, strict=True)
    )
    assert diff <= atol, f"max logit diff {diff}"
    if kind != "mistral_sliding":  # every layer sliding: a bounded cache, nothing tiered
        for tier in ("gpu", "host", "disk"):
            assert stats[tier]["blocks"] > 0, stats


@pytest.mark.parametrize("split", [True, False])
def test_resident_blocks_copy_beside_the_pcie_copies(tiny_model, tmp_path, monkeypatch, split):
    """Scenario: a streamed step's gathers copy GPU-resident blocks on a stream of their own
    (beside the host-to-GPU copies, not after them) and the tokens stay exact; the A/B switch
    puts them back in series on one stream."""
    monkeypatch.setattr(Mover, "SPLIT_DEVICE_COPIES", split)
    model, config = tiny_model("llama")
    model = copy.deepcopy(model).cuda()
    ids = random_prompt(300).cuda()
    expected = reference_generate(model, ids, max_new_tokens=16)
    cfg = tiered_config(config, tmp_path, 316, gpu_blocks=6, host_blocks=8)
    with kvtier.TieredCache(model, cfg) as cache:
        got = reference_generate(model, ids, cache=cache, max_new_tokens=16)
        streams = cache.controller.mover._streams
        assert torch.equal(expected.sequences, got.sequences)
        assert cache.stats()["transfer"]["d2d_bytes"] > 0
        assert ((Lane.PREFETCH, torch.device("cuda", 0), True) in streams) is split, streams


def test_host_slabs_are_pinned_exactly(tiny_model, tmp_path):
    """Scenario: host bytes_used is the real pinned bytes (no power-of-two rounding), within budget."""
    model, config = tiny_model("llama")
    model = copy.deepcopy(model).cuda()
    cfg = tiered_config(config, tmp_path, 316, gpu_blocks=6, host_blocks=7)
    with kvtier.TieredCache(model, cfg) as cache:
        model.generate(random_prompt(300).cuda(), past_key_values=cache, max_new_tokens=16)
        host = cache.controller.stores[Tier.HOST]
        host.finish_pinning()
        assert host.pinned_bytes == host.bytes_used > 0
        assert host.bytes_used <= cfg.host.budget_bytes
        cache.controller.check_invariants()


def test_keys_and_values_on_gpu_match_dynamic_cache(tiny_model, tmp_path):
    """Scenario: on CUDA, .keys/.values gathered from GPU, host and disk equal DynamicCache's
    and lie on the layer's device; two caches on one model, the first closed, the second works."""
    model, config = tiny_model("llama")
    model = copy.deepcopy(model).cuda()
    ids = random_prompt(300).cuda()
    expected = reference_generate(model, ids, max_new_tokens=16)
    cfg = tiered_config(config, tmp_path, 316, gpu_blocks=6, host_blocks=8)
    first = kvtier.TieredCache(model, cfg)
    with kvtier.TieredCache(model, cfg) as cache:
        first.close()
        got = reference_generate(model, ids, cache=cache, max_new_tokens=16)
        assert torch.equal(expected.sequences, got.sequences)
        stats = cache.stats()
        assert all(stats[tier]["blocks"] > 0 for tier in ("gpu", "host", "disk")), stats
        for want, have in zip(expected.past_key_values.layers, cache.layers, strict=True):
            assert have.keys.device == want.keys.device
            torch.testing.assert_close(have.keys, want.keys, atol=1e-4, rtol=0)
            torch.testing.assert_close(have.values, want.values, atol=1e-4, rtol=0)


def test_second_cache_takes_the_first_caches_pinned_slabs(tiny_model, tmp_path):
    """Scenario: a cache closed in this process leaves its registered host slabs to the next
    cache, whose slabs are pinned from their first use (nothing registered anew), and
    release_pinned_memory() frees them."""
    kvtier.release_pinned_memory()
    model, config = tiny_model("llama")
    model = copy.deepcopy(model).cuda()
    cfg = tiered_config(config, tmp_path, 316, gpu_blocks=6, host_blocks=7)
    prompt = random_prompt(300).cuda()
    with kvtier.TieredCache(model, cfg) as cache:
        first = model.generate(prompt, past_key_values=cache, max_new_tokens=8)
        host = cache.controller.stores[Tier.HOST]
        host.finish_pinning()
        kept = host.bytes_used
    with kvtier.TieredCache(model, cfg) as cache:
        second = model.generate(prompt, past_key_values=cache, max_new_tokens=8)
        host = cache.controller.stores[Tier.HOST]
        assert host._pinner is None  # every slab came registered
        assert host.pinned_bytes == host.bytes_used == kept
    assert torch.equal(first, second)
    assert kvtier.release_pinned_memory() == kept


def test_prefill_speed_is_timed_by_cuda_events(tiny_model, tmp_path):
    """Scenario: on CUDA a prefill is timed by events read once complete (no sync), or when its
    cache closes: after a one-token generate, the next cache's reuse choice uses a measured speed;
    the token ids that key the blocks came to the host without a blocking copy, and key them
    right: the next generate of the same prompt reuses its blocks with DynamicCache's tokens."""
    from kvtier.controller.index import INDEX
    from kvtier.hf import reuse

    INDEX.clear()
    model, config = tiny_model("llama")
    model = copy.deepcopy(model).cuda()
    ids = random_prompt(100).cuda()
    cfg = tiered_config(config, tmp_path, 140, disk_persist=True)
    with kvtier.TieredCache(model, cfg) as cache:
        model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
        fingerprint = cache.spec.fingerprint
    # closing the cache recorded its last prefill (no later call would have)
    assert INDEX.prefill_flops(fingerprint) is not None
    assert not reuse._PENDING
    expected = reference_generate(model, ids, max_new_tokens=24)
    got, stats = tiered_generate(model, cfg, ids, max_new_tokens=24)
    assert torch.equal(expected.sequences, got.sequences)
    assert stats["prefix_hit_tokens"] > 0 and "measured" in stats["reuse"]["reason"]
    INDEX.clear()


@pytest.mark.parametrize("round_blocks", [None, 2])
def test_disk_prefix_reused_into_gpu_slots(tiny_model, tmp_path, monkeypatch, round_blocks):
    """Scenario: on CUDA a persisted 12-block prefix is read from disk into pinned bounce
    buffers and copied up into GPU slots (the rest into pinned host slots), also when the
    bounce-buffer bound splits the GPU part into rounds of 2 blocks; tokens and logits exact."""
    from kvtier.controller import reuse
    from kvtier.controller.index import INDEX
    from kvtier.transfer import Mover

    model, config = tiny_model("llama")
    model = copy.deepcopy(model).cuda()
    ids = random_prompt(200).cuda()
    expected = reference_generate(model, ids, max_new_tokens=8)
    cfg = tiered_config(config, tmp_path, 240, gpu_blocks=8, host_blocks=8, disk_persist=True)
    _, first = tiered_generate(model, cfg, ids, max_new_tokens=8)
    with kvtier.TieredCache(model, cfg) as probe:
        fingerprint = probe.spec.fingerprint
    INDEX.clear()
    INDEX.record_prefill(fingerprint, 1.0, 1.0)  # a slow prefill: loading wins on CUDA too
    if round_blocks:
        monkeypatch.setattr(reuse, "BOUNCE_BYTES", round_blocks * first["block_bytes"])
    reads: list[int] = []
    submit = Mover.submit_reads

    def counted(self, batch):
        reads.append(len(batch))
        return submit(self, batch)

    monkeypatch.setattr(Mover, "submit_reads", counted)
    try:
        got, stats = tiered_generate(model, cfg, ids, max_new_tokens=8)
    finally:
        INDEX.clear()
    assert torch.equal(expected.sequences, got.sequences)
    diff = max(
        (a.float() - b.float()).abs().max().item()
        for a, b in zip(expected.logits, got.logits, strict=True)
    )
    assert diff <= 1e-4, f"max logit diff {diff}"
    assert stats["prefix_hit_tokens"] == 12 * 16 and sum(reads) == 12
    assert len(reads) > 1 if round_blocks else reads == [12]
