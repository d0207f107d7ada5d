"""The load-or-recompute cost model: recomputing a block costs its FLOPs at its positions (the
matmuls' plus attention's over every earlier position) over the measured FLOP/s."""

from __future__ import annotations

import pytest

from kvtier.blocks import Tier
from kvtier.controller.costs import (
    BLOCK_OVERHEAD_S,
    PAGE_CACHE,
    Bandwidths,
    PrefillFlops,
    choose,
)

# Llama-3-8B's shape: ~7.0e9 weights outside the embedding, 32 layers x 32 query heads x 128
LLAMA_8B = PrefillFlops(per_token=2 * 7.0e9, per_pair=4 * 32 * 32 * 128)
BLOCK_TOKENS = 256
BLOCK_BYTES = 32 << 20  # 128 KiB a position in bf16
DISK = Bandwidths({Tier.DISK: 3.0}, {Tier.DISK: "measured in the test"})  # 11.2 ms a block
RATE = 4e14  # FLOP/s: 9.0 ms a block of matmuls, plus attention's 0.3 ms a block deep


def _choose(
    flops: PrefillFlops,
    blocks: int,
    *,
    rate: float = RATE,
    batch: int = 1,
    sources: list | None = None,
    bandwidth: Bandwidths = DISK,
    **more,
):
    """The choice over `blocks` disk blocks (or those `sources`), the test's figures."""
    return choose(
        [Tier.DISK] * blocks if sources is None else sources,
        block_bytes=BLOCK_BYTES,
        block_tokens=BLOCK_TOKENS,
        bandwidth=bandwidth,
        flops=flops,
        flops_per_s=rate,
        rate_source="measured in this process",
        batch=batch,
        **more,
    )


def test_span_counts_every_query_key_pair() -> None:
    """Scenario: positions [start, end) with the ones before cached: each position p pays the
    matmuls once and attends to p + 1 keys; spans add up."""
    flops = PrefillFlops(per_token=10.0, per_pair=1.0)
    assert flops.span(0, 1) == 10 + 1
    assert flops.span(3, 2) == 2 * 10 + (4 + 5)
    assert flops.span(0, 300) == flops.span(0, 100) + flops.span(100, 200)
    assert PrefillFlops(per_token=10.0).span(1000, 4) == 40  # the linear model: no position


def test_attention_makes_a_long_prefix_worth_loading() -> None:
    """Scenario: a 32K-token prefix of an 8B model on disk at 3 GB/s: a block loads in 11.5 ms
    and its matmuls take 9.0 ms, so the linear model recomputes all 128 blocks; with attention
    the deep blocks take up to 20 ms and the whole prefix 1.85 s, so loading (1.47 s) wins."""
    linear = _choose(PrefillFlops(per_token=LLAMA_8B.per_token), 128)
    assert linear.decision == "recompute"
    choice = _choose(LLAMA_8B, 128)
    assert choice.decision == "load" and choice.blocks == 128
    positions = 128 * BLOCK_TOKENS
    expected = (
        LLAMA_8B.per_token * positions + LLAMA_8B.per_pair * positions * (positions + 1) / 2
    ) / RATE
    assert choice.predicted_recompute_s == pytest.approx(expected, rel=1e-9)
    assert choice.predicted_recompute_s == pytest.approx(1.8504, abs=1e-3)
    assert linear.predicted_recompute_s == pytest.approx(1.1469, abs=1e-3)  # matmuls only
    load = 128 * (BLOCK_OVERHEAD_S[Tier.DISK] + BLOCK_BYTES / 3e9)
    assert choice.predicted_load_s == pytest.approx(load)
    assert "loading all 128 blocks is faster" in choice.reason
    assert "prefill 400 TFLOP/s (measured in this process)" in choice.reason
    # the first block computes at 28.4K tok/s, the last at 12.9K: the reason shows both
    assert "28,435 tok/s at position 0, 12,856 at 32,512" in choice.reason


def test_a_short_prefix_still_recomputes() -> None:
    """Scenario: the same model and disk, a 4-block prefix: attention adds little that early,
    so recomputing stays faster and the reason says so."""
    choice = _choose(LLAMA_8B, 4)
    assert choice.decision == "recompute" and "recomputing is faster" in choice.reason
    assert choice.predicted_recompute_s < choice.predicted_load_s


def test_measured_rate_predicts_its_own_prefill_and_deeper_blocks_cost_more() -> None:
    """Scenario: a 4096-position prefill measured at 2 s gives a FLOP/s that predicts 2 s for
    those 16 blocks again, but for its first quarter only 0.47 s (the linear model: 0.5 s) and
    for a batch of 2 rows twice as long."""
    seconds = 2.0
    rate = LLAMA_8B.span(0, 4096) / seconds
    assert _choose(LLAMA_8B, 16, rate=rate).predicted_recompute_s == pytest.approx(seconds)
    quarter = _choose(LLAMA_8B, 4, rate=rate).predicted_recompute_s
    assert quarter == pytest.approx(seconds * LLAMA_8B.span(0, 1024) / LLAMA_8B.span(0, 4096))
    assert quarter == pytest.approx(0.4733, abs=1e-4)
    batch = _choose(LLAMA_8B, 16, rate=rate, batch=2).predicted_recompute_s
    assert batch == pytest.approx(2 * seconds)


def test_loads_slower_than_predicted_here_scale_the_prediction() -> None:
    """Scenario: this process's disk loads took 4x what the model predicted (decode, checksums
    and overheads it does not know): later predictions from disk are 4x too, the reason says
    so, and a prefix that loaded faster than it computed now recomputes."""
    plain = _choose(LLAMA_8B, 128)
    scaled = _choose(LLAMA_8B, 128, load_scale={Tier.DISK: 4.0})
    assert plain.decision == "load" and scaled.decision == "recompute"
    assert scaled.predicted_load_s == pytest.approx(4 * plain.predicted_load_s)
    assert "loads here took x4 that" in scaled.reason


def test_a_prefix_in_the_page_cache_loads_where_a_cold_one_recomputes() -> None:
    """Scenario: 32K tokens of an 8B model stored on a disk read at 1.6 GB/s (21 ms a block,
    over the 9-10 ms a block computes): recompute; the same files held by the page cache (5 GB/s,
    6.7 ms a block): load, and the reason names the page cache's speed. A calibration learned on
    cold disk loads does not scale page-cache predictions (their own source)."""
    speeds = Bandwidths(
        {Tier.DISK: 1.6, PAGE_CACHE: 5.0},
        {Tier.DISK: "measured in the test", PAGE_CACHE: "measured in the test, page cache"},
    )
    cold = _choose(LLAMA_8B, 128, bandwidth=speeds)
    cached = _choose(
        LLAMA_8B, 128, sources=[PAGE_CACHE] * 128, bandwidth=speeds, load_scale={Tier.DISK: 4.0}
    )
    assert cold.decision == "recompute" and cached.decision == "load"
    per_block = BLOCK_OVERHEAD_S[PAGE_CACHE] + BLOCK_BYTES / 5.0e9
    assert cached.predicted_load_s == pytest.approx(128 * per_block)
    assert "page_cache 5 GB/s (measured in the test, page cache)" in cached.reason
    assert "loads here took" not in cached.reason
    mixed = _choose(LLAMA_8B, 128, sources=[PAGE_CACHE] * 64 + [Tier.DISK] * 64, bandwidth=speeds)
    assert 64 <= mixed.blocks < 128  # the cached run loads; the cold rest is not worth it all
