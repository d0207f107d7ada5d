"""The mover's merging of copies that continue one another (kvtier/coalesce.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.copies import coalesce


def _slab(slots: int, *, fill: bool) -> torch.Tensor:
    """[layers, slots, block_tokens, 2, heads, head_dim], as SlabPool lays a slab out."""
    shape = (3, slots, 4, 2, 2, 5)
    if fill:
        return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    return torch.zeros(shape)


def _block(slab: torch.Tensor, slot: int) -> list[torch.Tensor]:
    return [slab[layer, slot] for layer in range(slab.shape[0])]


def _copies(src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]):
    """Per-layer copies of whole blocks, slot by slot, in block order (as _per_layer makes)."""
    return [(s, d) for a, b in pairs for s, d in zip(_block(src, a), _block(dst, b), strict=True)]


def test_a_run_of_slots_is_one_copy_a_layer():
    src, dst = _slab(8, fill=True), _slab(8, fill=False)
    merged = coalesce(_copies(src, dst, [(1, 4), (2, 5), (3, 6)]))
    assert len(merged) == 3  # one per layer
    for s, d in merged:
        d.copy_(s)
    assert torch.equal(dst[:, 4:7], src[:, 1:4])
    assert dst[:, :4].abs().sum() == 0 and dst[:, 7].abs().sum() == 0


def test_a_gap_on_either_side_starts_a_new_copy():
    src, dst = _slab(8, fill=True), _slab(8, fill=False)
    # 1->4, 2->5 continue; 4->6 breaks on the source; 5->0 breaks on the destination
    merged = coalesce(_copies(src, dst, [(1, 4), (2, 5), (4, 6), (5, 0)]))
    assert len(merged) == 3 * 3
    for s, d in merged:
        d.copy_(s)
    for a, b in [(1, 4), (2, 5), (4, 6), (5, 0)]:
        assert torch.equal(dst[:, b], src[:, a])


def test_other_storages_and_strided_views_are_left_alone():
    src, dst = _slab(4, fill=True), _slab(4, fill=False)
    other = _slab(4, fill=False)
    strided = src[0, :, :, 0]  # [slots, block_tokens, heads, head_dim], not contiguous
    copies = [(src[0, 0], dst[0, 0]), (src[0, 1], other[0, 1]), (strided, other[0, :, :, 0])]
    assert coalesce(copies) == copies


def test_a_leading_size_one_dim_with_any_stride_merges_correctly():
    base = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(6, 4)
    # [1, 4] views whose dim-0 stride is not 4 are still contiguous
    first = base[0:1].as_strided((1, 4), (99, 1), 0)
    second = base[1:2]
    out = torch.zeros(6, 4)
    ((s, d),) = coalesce([(first, out[0:1]), (second, out[1:2])])
    d.copy_(s)
    assert torch.equal(out[:2], base[:2]) and out[2:].abs().sum() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=12, unique=True), st.randoms())
def test_merged_copies_move_what_the_copies_did(targets, rng):
    """Property: for any slot mapping, the merged copies leave the destination as the per-pair
    copies do, and never more copies than pairs."""
    sources = rng.sample(range(16), len(targets))
    pairs = list(zip(sorted(sources), targets, strict=True))
    src = _slab(16, fill=True)
    expected, got = _slab(16, fill=False), _slab(16, fill=False)
    for s, d in _copies(src, expected, pairs):
        d.copy_(s)
    merged = coalesce(_copies(src, got, pairs))
    assert len(merged) <= len(pairs) * 3
    for s, d in merged:
        d.copy_(s)
    assert torch.equal(got, expected)
