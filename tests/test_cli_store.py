"""`kvtier store ls|du|verify|gc|clear PATH` on real stores written by DiskStore."""

from __future__ import annotations

import os
from pathlib import Path

import format1
import torch
from click.testing import CliRunner

from kvtier import cli
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.disk.areas import StoreLayout

GiB = 1 << 30


def invoke(*args: str):
    return CliRunner().invoke(cli.main, ["store", *args])


def _id(index: int) -> str:
    return f"{index:02x}" + "d" * 30


def _block(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"l0.kv": torch.randn(16, 2, 1, 2, 8, generator=generator).to(torch.bfloat16)}


def _fill(root: Path) -> DiskStore:
    """Two models: three blocks of org/a@1 (one private to a live store), one of a keyless model."""
    keyed = DiskStore(root, budget_bytes=GiB, fingerprint="fp-a", model_key="org/a@1", codec="raw")
    for index in range(3):
        keyed.write_block(_id(index), _block(index), parent_id=None, persist=index < 2, tokens=16)
    other = DiskStore(root, budget_bytes=GiB, fingerprint="fp-b", codec="shuffle+lz4")
    other.write_block(_id(9), _block(9), parent_id=None)
    other.close()
    return keyed


def test_every_command_has_help_with_an_example():
    for command in ("ls", "du", "verify", "gc", "clear"):
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert f"kvtier store {command} ~/.cache/kvtier" in result.output


def test_ls_lists_blocks_with_model_tokens_bytes_ratio_and_place(tmp_path):
    keyed = _fill(tmp_path)
    result = invoke("ls", str(tmp_path))
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.split() == ["BLOCK", "MODEL", "TOKENS", "BYTES", "RATIO", "LAST", "USE", "WHERE"]
    rows = {line.split()[0]: line for line in lines}
    assert set(rows) == {_id(0), _id(1), _id(2), _id(9)}
    assert "org/a@1  16" in rows[_id(0)] and "shared, in use by 1" in rows[_id(0)]
    assert f"process {os.getpid()}" in rows[_id(2)] and "1.00" in rows[_id(2)]
    assert "fp-b" in rows[_id(9)] and rows[_id(9)].rstrip().endswith("shared")
    keyed.close()


def test_ls_verify_and_clear_handle_blocks_of_format_1(tmp_path):
    """Scenario: a store upgraded from format 1 still holds blake2b-128 blocks: ls marks them,
    verify checks them and clear deletes them."""
    keyed = _fill(tmp_path)
    old = format1.write_block(
        StoreLayout(tmp_path).shared(_id(5)), _id(5), _block(5), fingerprint="fp-old"
    )
    rows = {line.split()[0]: line for line in invoke("ls", str(tmp_path)).output.splitlines()}
    assert "shared, format 1 (never reused" in rows[_id(5)] and "format" not in rows[_id(0)]
    result = invoke("verify", str(tmp_path))
    assert result.exit_code == 0 and "checked 5 block files: 0 bad" in result.output
    assert invoke("clear", str(tmp_path), "--yes").exit_code == 0
    assert not old.exists()
    keyed.close()


def test_du_totals_per_model_and_the_store(tmp_path):
    keyed = _fill(tmp_path)
    result = invoke("du", str(tmp_path))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    by_model = {line.split()[0]: line.split() for line in lines[1:3]}
    assert by_model["org/a@1"][1:3] == ["3", "48"] and by_model["fp-b"][1:3] == ["1", "-"]
    assert lines[3].startswith("store: ") and lines[4] == "quarantine: 0 files"
    keyed.close()


def test_verify_names_bad_files_and_quarantines_them(tmp_path):
    """Scenario: a flipped payload byte and a truncated file: verify exits 1 naming both; with
    --quarantine they move aside and the next verify passes."""
    _fill(tmp_path).close()
    layout = StoreLayout(tmp_path)
    flipped, truncated = layout.shared(_id(0)), layout.shared(_id(9))
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    (layout.tree / "00" / "notes.txt").write_text("not a block")
    result = invoke("verify", str(tmp_path))
    assert result.exit_code == 1
    assert f"bad: {flipped}: checksum mismatch" in result.output
    assert f"bad: {truncated}: truncated file" in result.output
    assert "notes.txt: not a kvtier block or temp file" in result.output
    assert "checked 3 block files: 3 bad" in result.output
    result = invoke("verify", str(tmp_path), "--quarantine")
    assert result.exit_code == 1 and result.output.count("(moved to ") == 3
    assert not flipped.exists() and len(list(layout.quarantine.iterdir())) == 3
    result = invoke("verify", str(tmp_path))
    assert result.exit_code == 0 and "checked 1 block files: 0 bad" in result.output


def test_gc_to_a_size_keeps_the_most_recent_and_blocks_in_use(tmp_path):
    keyed = _fill(tmp_path)
    layout = StoreLayout(tmp_path)
    os.utime(layout.shared(_id(9)), ns=(1, 1))  # the oldest last use
    size = layout.shared(_id(1)).stat().st_size
    result = invoke("gc", str(tmp_path), "--max-size", str(3 * size))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("removed 1 blocks")
    assert not layout.shared(_id(9)).exists() and layout.shared(_id(0)).exists()
    result = invoke("gc", str(tmp_path), "--max-size", "0")
    assert "removed 0 blocks" in result.output  # the rest is in use by `keyed`
    keyed.close()
    assert invoke("gc", str(tmp_path), "--max-size", "0").output.startswith("removed 2 blocks")
    assert list(layout.tree.glob("??")) == []  # empty shard folders go too
    result = invoke("gc", str(tmp_path), "--max-size", "3 parsecs")
    assert result.exit_code == 2 and "--max-size = '3 parsecs' is not a size" in result.output


def test_clear_needs_yes_and_leaves_running_processes_their_blocks(tmp_path):
    keyed = _fill(tmp_path)
    result = invoke("clear", str(tmp_path))
    assert result.exit_code == 2 and "add --yes" in result.output
    result = invoke("clear", str(tmp_path), "--yes")
    assert result.exit_code == 0, result.output
    assert "3 blocks held by running processes remain" in result.output
    assert list(StoreLayout(tmp_path).tree.glob("??/*")) == []
    assert keyed.read_block(_id(0)) is not None  # its link still holds the data
    keyed.close()
    assert invoke("ls", str(tmp_path)).output.splitlines()[1:] == []


def test_a_store_of_another_format_or_no_store_is_refused_in_one_line(tmp_path):
    (tmp_path / "store.json").write_text('{"format_version": "7"}')
    result = invoke("ls", str(tmp_path))
    assert result.exit_code == 2
    assert result.output.startswith("kvtier: error: the store at") and "format 7" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = invoke("du", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "no kvtier store at" in result.output
    (tmp_path / "empty").mkdir()
    assert "no store.json" in invoke("verify", str(tmp_path / "empty")).output
