"""`kvtier plan MODEL --context N`: the plan from a config alone, refusals in one line."""

from __future__ import annotations

import json
import os
import shutil
import types

import psutil
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config

from kvtier import cli, measured

GIB = 1 << 30


@pytest.fixture(autouse=True)
def machine(monkeypatch, tmp_path):
    """A CPU machine with 20 GiB RAM available and 100 GiB disk free; no bench results and no
    fetched models (XDG_CACHE_HOME is empty), a clean KVTIER_* environment."""
    for name in list(os.environ):
        if name.startswith("KVTIER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    memory = types.SimpleNamespace(total=32 * GIB, available=20 * GIB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    usage = shutil._ntuple_diskusage(200 * GIB, 100 * GIB, 100 * GIB)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def plan(*args: str, tmp_path):
    store = ["--set", f"disk.path={tmp_path / 'store'}"]
    return CliRunner().invoke(cli.main, ["plan", *args, *store])


def test_smollm2_from_its_shipped_config_without_fetching(tmp_path):
    """Scenario: plan reads smollm2's config shipped with kvtier; nothing is downloaded."""
    result = plan("smollm2", "--context", "8192", tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "llama, 30 layers (30 tiered), 3 KV heads x 64" in out
    assert "KV: 45.00 KiB per token, 360.00 MiB in all" in out  # 2 * 30 * 3 * 64 * 4 bytes
    assert "in place: every block fits the GPU budget" in out
    assert not (tmp_path / "cache" / "kvtier" / "models").exists()


def test_streamed_plan_splits_tiers_and_names_its_speeds(tmp_path):
    budgets = ["--set", "gpu.budget=1GiB", "--set", "host.budget=2GiB"]
    result = plan("smollm2", "--context", "100000", *budgets, "--json", tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["tokens"] == 100000 and data["problem"] is None and not data["in_place"]
    assert sum(data["tokens_per_tier"].values()) == 100000
    assert data["blocks"]["gpu"] > 0 and data["blocks"]["host"] > 0 and data["blocks"]["disk"] > 0
    assert (
        data["streamed_bytes_per_step"]
        == (data["blocks"]["host"] + data["blocks"]["disk"]) * data["block_bytes"]
    )
    assert data["step_s"] > 0 and "assumed" in data["step_sources"]["disk_read"]
    assert data["largest_tokens"] > 100000
    text = plan("smollm2", "--context", "100000", *budgets, tmp_path=tmp_path).stdout
    assert "compute not included" in text and "disk read 1.90 GB/s, assumed" in text


def test_measured_speeds_replace_the_assumed_ones(tmp_path):
    (tmp_path / "store").mkdir()
    disk = {
        "path": str(tmp_path),
        "device": measured.file_system_id(tmp_path),
        "write_gbps": 0.4,
        "read_gbps": 0.8,
        "measured_at": "2030-01-02T00:00:00",
    }
    copies = [{"kind": "host_memcpy", "bytes": 1 << 16, "gbps": 4.0}]
    measured.write_bench({"disk": [disk], "copies": copies, "measured_at": "2030-01-02"})
    budgets = ["--set", "gpu.budget=1GiB", "--set", "host.budget=2GiB"]
    data = json.loads(
        plan("smollm2", "--context", "100000", *budgets, "--json", tmp_path=tmp_path).stdout
    )
    assert (data["copy_gbps"], data["disk_read_gbps"]) == (4.0, 0.8)
    assert data["step_sources"]["disk_read"] == f"measured at {tmp_path} on 2030-01-02"


def test_a_context_that_cannot_fit_is_refused_in_one_line(tmp_path):
    budgets = [
        "--set",
        "gpu.budget=64MiB",
        "--set",
        "host.budget=1GiB",
        "--set",
        "disk.budget=2GiB",
    ]
    result = plan("smollm2", "--context", "1000000", *budgets, tmp_path=tmp_path)
    assert result.exit_code == 2
    assert "largest context under these budgets" in result.stdout
    assert result.stderr.startswith("kvtier: error: smollm2: gpu budget 67108864 bytes cannot")
    assert result.stderr.count("\n") == 1 and "at most" in result.stderr


def test_a_hybrid_model_counts_only_its_full_attention_layers(tmp_path):
    tiny_config("gemma3").save_pretrained(tmp_path / "gemma")
    result = plan(str(tmp_path / "gemma"), "--context", "1000", "--json", tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["layers"], data["tiered_layers"], data["head_dim"]) == (6, 3, 16)
    assert data["kv_bytes_per_token"] == 3 * 2 * 2 * 16 * 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["nosuch-model", "--context", "10"], "unknown model 'nosuch-model'"),
        (["smollm2", "--context", "10", "--set", "gpu.budge=1GiB"], "did you mean 'gpu.budget'"),
        (["smollm2", "--context", "10", "--set", "gpu.budget"], "is not KEY=VALUE"),
        (["smollm2", "--context", "10", "--set", "block_tokens=17"], "multiple of 16"),
    ],
)
def test_user_errors_are_one_line_exit_2(args, fragment, tmp_path):
    result = plan(*args, tmp_path=tmp_path)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and result.stderr.count("\n") == 1


def test_help_has_an_example():
    result = CliRunner().invoke(cli.main, ["plan", "--help"])
    assert result.exit_code == 0 and "kvtier plan smollm2 --context 8192" in result.stdout


def test_gpus_splits_layers_and_reports_each_device(tmp_path):
    """Scenario: --gpus 2 splits smollm2's 30 layers 15/15; gpu.budget applies to each GPU and
    [gpu.devices] overrides one (a size for a GPU this CPU machine lacks is allowed to plan)."""
    sets = ["--set", "gpu.budget=300MiB", "--set", "gpu.devices.cuda:1=400MiB"]
    sets += ["--set", "host.budget=1GiB", "--set", "disk.budget=4GiB"]
    result = plan(
        "smollm2", "--context", "70000", "--gpus", "2", *sets, "--json", tmp_path=tmp_path
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {row["device"]: row for row in data["devices"]}
    assert list(rows) == ["cuda:0", "cuda:1"]
    assert [row["tiered_layers"] for row in rows.values()] == [15, 15]
    assert (
        rows["cuda:0"]["budget_bytes"] == 300 << 20 and rows["cuda:1"]["budget_bytes"] == 400 << 20
    )
    for row in rows.values():  # the tighter cuda:0 bounds the slots both hold
        assert row["staging_bytes"] + row["slot_bytes"] <= row["budget_bytes"]
        assert row["slot_bytes"] == data["blocks"]["gpu"] * data["block_bytes"] // 2
    room0 = rows["cuda:0"]["budget_bytes"] - rows["cuda:0"]["staging_bytes"]
    assert data["blocks"]["gpu"] == room0 // (data["block_bytes"] // 2)
    text = plan("smollm2", "--context", "70000", "--gpus", "2", *sets, tmp_path=tmp_path).stdout
    assert "DEVICE" in text and "cuda:1      15  400.00 MiB" in text
    assert "gpu   700.00 MiB" in text  # the tier's budget: both devices'


def test_one_device_plan_has_no_device_table(tmp_path):
    """Scenario: without --gpus (and with --gpus 1) the plan reads as before: no per-device rows."""
    sets = ["--set", "gpu.budget=300MiB", "--set", "host.budget=1GiB"]
    plain = plan("smollm2", "--context", "70000", *sets, tmp_path=tmp_path)
    one = plan("smollm2", "--context", "70000", "--gpus", "1", *sets, tmp_path=tmp_path)
    assert plain.exit_code == 0, plain.output
    assert "DEVICE" not in plain.stdout and "devices" not in json.loads(
        plan("smollm2", "--context", "70000", *sets, "--json", tmp_path=tmp_path).stdout
    )
    # one GPU named cuda:0 instead of this machine's CPU: the same numbers
    assert one.stdout == plain.stdout


def test_a_device_budget_too_small_names_the_device(tmp_path):
    sets = ["--set", "gpu.budget=1GiB", "--set", "gpu.devices.cuda:1=64MiB"]
    result = plan("smollm2", "--context", "200000", "--gpus", "2", *sets, tmp_path=tmp_path)
    assert result.exit_code == 2
    assert "gpu budget 67108864 bytes on cuda:1 cannot stream 200000 tokens" in result.stderr


def test_a_remote_tier_is_shown_without_connecting_or_leaking_its_password(tmp_path):
    """Scenario (issue 13): `kvtier plan` shows the remote tier. Nothing listens on the port
    (the plan reads config only), and the URL's password never reaches the output."""
    url = "--set", "remote.url=valkey://fleet:hunter2@127.0.0.1:1"
    result = plan("smollm2", "--context", "1000", *url, tmp_path=tmp_path)
    assert result.exit_code == 0, result.output
    assert "remote: valkey://fleet:***@127.0.0.1:1" in result.output
    assert "hunter2" not in result.output
    blocks = 1000 // 256
    assert f"a stored prefix of all {blocks} whole blocks" in result.output
    result = plan("smollm2", "--context", "1000", "--json", *url, tmp_path=tmp_path)
    remote = json.loads(result.output)["remote"]
    assert remote["blocks"] == blocks and remote["load_s"] > 0 and remote["source"] == "assumed"
    assert "hunter2" not in result.output
    plain = json.loads(plan("smollm2", "--context", "1000", "--json", tmp_path=tmp_path).output)
    assert "remote" not in plain
