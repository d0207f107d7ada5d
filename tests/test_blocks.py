"""BlockId and BlockTable."""

from __future__ import annotations

from kvtier.blocks import BlockTable, block_id


def test_block_id_is_fixed_across_processes():
    """Scenario: the hash never silently changes (ids name files on disk across restarts)."""
    assert block_id(None, [1, 2, 3], "fp") == block_id(None, [1, 2, 3], "fp")
    assert block_id(None, [1, 2, 3], "fp") == "bb8fedd6fd78280439ce4bee8285e7d9"


def test_block_id_chains_and_separates_models():
    """Scenario: equal prefixes give equal ids; a different parent, token or model does not."""
    first = block_id(None, [5, 6], "model-a")
    assert len(first) == 32
    second = block_id(first, [7, 8], "model-a")
    assert block_id(first, [7, 8], "model-a") == second
    assert block_id(block_id(None, [5, 9], "model-a"), [7, 8], "model-a") != second
    assert block_id(None, [5, 6], "model-b") != first
    assert block_id(None, b"\x05\x06", "model-a") != first


def test_block_table_open_truncate_seq_tokens():
    """Scenario: the open block fills, a new one opens, truncate drops the tail."""
    table = BlockTable(16)
    assert table.seq_tokens == 0
    block = table.open_block()
    block.tokens = 16
    assert table.open_block() is not block and len(table) == 2
    table[1].tokens = 3
    assert table.seq_tokens == 19
    dropped = table.truncate(1)
    assert [b.index for b in dropped] == [1] and table.seq_tokens == 16
