"""Block ids (chained content hashes) and the BlockTable's bookkeeping."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.blocks import ID_BYTES, BlockMeta, BlockTable, Tier, block_id

FINGERPRINT = "fp-test"
# Computed once from the spec (DESIGN.md section 2) and written down: a change of the hash, the
# byte layout or the truncation silently orphans every block on users' disks, so it must show here.
ROOT_ID = "6aa11d50a0f0194fbeb56599822b48c9"  # block_id(None, [1, 2, 3, 50000], FINGERPRINT)
CHILD_ID = "44728f2f7fac61371ef35e1cafd9970c"  # block_id(ROOT_ID, range(16), FINGERPRINT)
RAW_ID = "3c885c2e4829ad9b78f539a7cf37276d"  # block_id(None, b"anon:0", FINGERPRINT)
SIGNED_ID = "86d664164a9026f2d2e0d441ef859f52"  # block_id(None, [-1, 2**63 - 1], "fp")
SHORT_ID = "bb8fedd6fd78280439ce4bee8285e7d9"  # block_id(None, [1, 2, 3], "fp")

token_lists = st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=8)
fast = settings(max_examples=50, deadline=None)


def test_ids_are_pinned_to_known_values():
    """Scenario: the id of fixed inputs never changes (the disk store is keyed by it)."""
    assert block_id(None, [1, 2, 3, 50000], FINGERPRINT) == ROOT_ID
    assert block_id(ROOT_ID, list(range(16)), FINGERPRINT) == CHILD_ID
    assert block_id(None, b"anon:0", FINGERPRINT) == RAW_ID
    assert block_id(None, [-1, 2**63 - 1], "fp") == SIGNED_ID
    assert block_id(None, [1, 2, 3], "fp") == SHORT_ID


def test_id_follows_the_written_spec():
    """Scenario: sha256(parent or "root", NUL, int64 LE tokens, NUL, fingerprint), first 128 bits."""
    tokens = [1, 2, 3, 50000]
    digest = hashlib.sha256(
        b"root\x00" + struct.pack("<4q", *tokens) + b"\x00" + FINGERPRINT.encode()
    ).hexdigest()
    assert block_id(None, tokens, FINGERPRINT) == digest[: 2 * ID_BYTES]
    raw = hashlib.sha256(b"root\x00raw:anon:0\x00" + FINGERPRINT.encode()).hexdigest()
    assert block_id(None, b"anon:0", FINGERPRINT) == raw[:32]


@fast
@given(parent=st.none() | st.text("0123456789abcdef", min_size=32, max_size=32), tokens=token_lists)
def test_ids_are_deterministic_hex(parent, tokens):
    first = block_id(parent, tokens, FINGERPRINT)
    assert first == block_id(parent, list(tokens), FINGERPRINT)
    assert first == block_id(parent, tuple(tokens), FINGERPRINT)  # any sequence of ints
    assert len(first) == 2 * ID_BYTES == 32
    int(first, 16)  # hex


@fast
@given(tokens=token_lists, other=token_lists)
def test_different_tokens_give_different_ids(tokens, other):
    if tokens != other:
        assert block_id(None, tokens, FINGERPRINT) != block_id(None, other, FINGERPRINT)


@fast
@given(tokens=token_lists, fingerprint=st.text(min_size=1, max_size=20))
def test_fingerprint_changes_the_id(tokens, fingerprint):
    """Scenario: two models (or fine-tunes) never share a block id for the same tokens."""
    if fingerprint != FINGERPRINT:
        assert block_id(None, tokens, fingerprint) != block_id(None, tokens, FINGERPRINT)


def test_chaining_makes_equal_ids_mean_equal_prefixes():
    """Scenario: the same block tokens after different prefixes get different ids; after equal
    prefixes, equal ids."""
    block = list(range(16))
    prefix_a = block_id(None, [7] * 16, FINGERPRINT)
    prefix_b = block_id(None, [8] * 16, FINGERPRINT)
    assert block_id(prefix_a, block, FINGERPRINT) != block_id(prefix_b, block, FINGERPRINT)
    assert block_id(prefix_a, block, FINGERPRINT) == block_id(prefix_a, block, FINGERPRINT)
    assert block_id(prefix_a, block, FINGERPRINT) != block_id(None, block, FINGERPRINT)
    first = block_id(None, [5, 6], "model-a")
    second = block_id(first, [7, 8], "model-a")
    assert block_id(block_id(None, [5, 9], "model-a"), [7, 8], "model-a") != second
    assert block_id(first, [7, 8], "model-b") != second


def test_token_order_and_batch_layout_matter():
    """Scenario: ids are over row-major tokens: swapping tokens or rows changes the id."""
    assert block_id(None, [1, 2], FINGERPRINT) != block_id(None, [2, 1], FINGERPRINT)
    rows = [[1, 2, 3], [4, 5, 6]]
    flat = [t for row in rows for t in row]
    swapped = [t for row in reversed(rows) for t in row]
    assert block_id(None, flat, FINGERPRINT) != block_id(None, swapped, FINGERPRINT)


def test_raw_bytes_ids_never_match_token_ids():
    """Scenario: an anonymous block (raw bytes) whose bytes equal a token list's encoding still
    gets another id, so it can never alias a real prefix."""
    tokens = [1, 2]
    encoded = struct.pack("<2q", *tokens)
    assert block_id(None, encoded, FINGERPRINT) != block_id(None, tokens, FINGERPRINT)
    assert block_id(None, b"a", FINGERPRINT) != block_id(None, b"b", FINGERPRINT)
    assert block_id(None, b"a", FINGERPRINT) == block_id(None, b"a", FINGERPRINT)


# -- BlockMeta and BlockTable ----------------------------------------------------------------------
def test_block_meta_tiers():
    block = BlockMeta(index=3)
    assert not block.sealed and block.tiers == frozenset()
    block.slots[Tier.DISK] = 0
    block.slots[Tier.HOST] = 5
    assert block.tiers == {Tier.HOST, Tier.DISK}
    assert block.fastest_tier() is Tier.HOST
    block.slots[Tier.GPU] = 1
    assert block.fastest_tier() is Tier.GPU
    block.block_id = ROOT_ID
    assert block.sealed


def test_open_block_fills_then_appends_a_new_one():
    table = BlockTable(16)
    assert len(table) == 0 and table.seq_tokens == 0
    first = table.open_block()
    assert first.index == 0 and len(table) == 1
    first.tokens = 10
    assert table.open_block() is first  # room left: the same block
    assert table.seq_tokens == 10
    first.tokens = 16
    second = table.open_block()
    assert second is not first and second.index == 1 and len(table) == 2
    assert table.seq_tokens == 16  # the new block holds nothing yet
    second.tokens = 3
    assert table.seq_tokens == 19
    assert [b.index for b in table] == [0, 1] and table[1] is second


def test_truncate_returns_the_dropped_blocks_with_their_slots():
    table = BlockTable(16)
    for index in range(4):
        block = table.open_block()
        block.tokens = 16
        block.slots[Tier(index % 3)] = index
    dropped = table.truncate(1)
    assert [b.index for b in dropped] == [1, 2, 3]
    assert [b.slots for b in dropped] == [{Tier.HOST: 1}, {Tier.DISK: 2}, {Tier.GPU: 3}]
    assert len(table) == 1 and table.seq_tokens == 16
    assert table.truncate(5) == [] and len(table) == 1
    assert table.open_block().index == 1  # indices continue from the kept blocks
    table.truncate(0)
    assert len(table) == 0 and table.seq_tokens == 0


def test_in_tier_lists_blocks_holding_a_copy():
    table = BlockTable(16)
    tiers = [{Tier.GPU}, {Tier.GPU, Tier.HOST}, {Tier.DISK}, {Tier.HOST, Tier.DISK}]
    for placed in tiers:
        block = table.open_block()
        block.tokens = 16
        block.slots.update({tier: 0 for tier in placed})
    assert [b.index for b in table.in_tier(Tier.GPU)] == [0, 1]
    assert [b.index for b in table.in_tier(Tier.HOST)] == [1, 3]
    assert [b.index for b in table.in_tier(Tier.DISK)] == [2, 3]


@fast
@given(steps=st.lists(st.integers(1, 40), max_size=12), keep=st.integers(0, 20))
def test_seq_tokens_counts_every_position(steps, keep):
    """Filling blocks step by step as the controller does keeps seq_tokens == tokens appended."""
    table = BlockTable(16)
    total = 0
    for q in steps:
        left = q
        while left:
            block = table.open_block()
            take = min(16 - block.tokens, left)
            block.tokens += take
            left -= take
        total += q
        assert table.seq_tokens == total
        assert len(table) == -(-total // 16)
    blocks = len(table)
    table.truncate(keep)
    assert table.seq_tokens == (total if keep >= blocks else keep * 16)


@pytest.mark.parametrize("block_tokens", [16, 256])
def test_full_blocks_of_any_size(block_tokens):
    table = BlockTable(block_tokens)
    for _ in range(3):
        table.open_block().tokens = block_tokens
    assert table.seq_tokens == 3 * block_tokens
