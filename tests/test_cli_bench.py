"""`kvtier bench`: measures at the store path, saves what codec auto and plan read."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from kvtier import cli, measured
from kvtier.tiers.disk import DiskStore


@pytest.fixture(autouse=True)
def cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def bench(tmp_path, *args: str):
    store = ["--set", f"disk.path={tmp_path / 'store'}", "--set", "disk.budget=1GiB"]
    return CliRunner().invoke(cli.main, ["bench", *store, "--size", "4MiB", *args])


def test_bench_prints_a_table_saves_it_and_leaves_no_files(tmp_path, cache_home):
    result = bench(tmp_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for row in (
        "disk write+fsync",
        "disk read",
        "codec shuffle+lz4",
        "host memcpy        64.00 KiB",
    ):
        assert row in out
    assert f"saved to {cache_home / 'kvtier' / 'bench.json'}" in out
    saved = measured.read_bench()
    assert saved["disk"][0]["path"] == str(tmp_path / "store") and saved["copies"]
    assert saved["codec"]["auto_choice"] in {"raw", "lz4", "shuffle+lz4"}
    assert not (tmp_path / "store").exists(), "the bench removes the folders it made"


def test_codec_auto_then_uses_the_measured_disk(tmp_path, caplog):
    """Scenario (issue 10): after `kvtier bench` the store's codec choice says "measured"."""
    assert bench(tmp_path, "--json").exit_code == 0
    store = DiskStore(tmp_path / "store", budget_bytes=1 << 30, fingerprint="f", codec="auto")
    with caplog.at_level(logging.INFO, logger="kvtier.tiers.codec"):
        store.write_block("ab" * 16, {"l0.kv": torch.randn(64, 2, 1, 2, 8)}, parent_id=None)
    store.close()
    assert f"measured at {tmp_path / 'store'} on" in caplog.text


def test_json_and_no_save(tmp_path):
    result = bench(tmp_path, "--json", "--no-save")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == measured.BENCH_FORMAT and data["disk"][0]["write_gbps"] > 0
    assert data["disk"][0]["parallel_read_gbps"] > 0 and data["disk"][0]["read_threads"] >= 1
    assert measured.read_bench() is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--size", "1MiB"], "too small"), (["--size", "lots"], "is not a size")],
)
def test_bad_sizes_are_one_line_exit_2(tmp_path, args, fragment):
    result = bench(tmp_path, *args)
    assert result.exit_code == 2 and fragment in result.stderr, result.output


def test_help_has_an_example():
    assert "kvtier bench --set disk.path=" in CliRunner().invoke(cli.main, ["bench", "-h"]).stdout
