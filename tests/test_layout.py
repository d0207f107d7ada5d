"""kvtier/layout.py additions for runs that must reach every tier (demo, verify)."""

from __future__ import annotations

import pytest

from kvtier.layout import MIN_GPU_BLOCKS, largest_chunk, spread_blocks, step_blocks


@pytest.mark.parametrize("blocks", [6, 7, 19, 64, 1000])
def test_spread_leaves_blocks_in_every_tier(blocks):
    gpu, host = spread_blocks(blocks)
    assert gpu >= MIN_GPU_BLOCKS + 2 and host >= 1 and blocks - gpu - host >= 2


def test_too_few_blocks_cannot_spread():
    assert spread_blocks(5) is None


def test_the_largest_chunk_fits_gpu_and_host_while_open():
    """Scenario: the demo's 4,608-token prompt in 256-token blocks: one 4096-token chunk fits."""
    gpu, host = spread_blocks(19)
    chunk = largest_chunk(gpu, host, 256)
    assert chunk == 4096 and step_blocks(chunk, 256) <= gpu + host
    assert step_blocks(chunk + 1, 256) > gpu + host
