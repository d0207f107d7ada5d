"""Tests for kvtier.cli: info on a CPU machine, config show|validate, demo wiring, error lines."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pynvml
import pytest
import torch
from click.testing import CliRunner

from kvtier import cli
from kvtier.errors import BudgetError

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def machine(monkeypatch, tmp_path):
    """A CPU machine with no NVML: 20 GiB RAM available, 100 GiB disk free, clean KVTIER_* env."""
    for name in list(os.environ):
        if name.startswith("KVTIER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_nvml():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    memory = types.SimpleNamespace(total=32 * GIB, available=20 * GIB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    usage = shutil._ntuple_diskusage(200 * GIB, 100 * GIB, 100 * GIB)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pynvml, "nvmlInit", no_nvml)
    yield
    logger = logging.getLogger("kvtier")  # main() installs a handler; leave no trace for others
    for handler in [h for h in logger.handlers if isinstance(h, cli._CliHandler)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def invoke(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert "0.1.0" in result.stdout


def test_info_on_a_cpu_machine():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for line in ("kvtier 0.1.0", "python ", "torch ", "transformers ", "safetensors ", "lz4 "):
        assert line in out
    assert "GPUs: none" in out
    assert "CUDA available (torch): no" in out
    assert "host RAM: 32.00 GiB total, 20.00 GiB available" in out
    assert "budgets: gpu 8.00 GiB, host 10.00 GiB, disk 80.00 GiB" in out
    assert "disk: 100.00 GiB free for" in out and "not created yet" in out
    assert "Traceback" not in result.output


def test_info_lists_gpus_from_nvml(monkeypatch):
    memory = types.SimpleNamespace(total=80 * GIB, free=70 * GIB)
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: index)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda handle: b"Fake H100")
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda handle: memory)
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert "GPUs: 1" in result.stdout
    assert "GPU 0: Fake H100, 80.00 GiB total, 70.00 GiB free" in result.stdout


def test_info_reports_a_bad_config_and_goes_on(monkeypatch):
    monkeypatch.setenv("KVTIER_HOST_BUDGET", "lots")
    result = invoke("info")
    assert result.exit_code == 0
    assert "config: error: host.budget = 'lots' is not a size" in result.stdout
    assert "disk: 100.00 GiB free for" in result.stdout


def test_config_show_text(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('[host]\nbudget = "1GiB"\n')
    result = invoke("config", "show", str(path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 13  # one per key, disk.model_key included
    assert lines[0].startswith("block_tokens = 256 ") and lines[0].endswith("# from default")
    by_key = {line.split(" = ")[0]: line for line in lines}
    assert by_key["gpu.budget"].startswith("gpu.budget = 8.00 GiB (8589934592 bytes) ")
    assert by_key["gpu.budget"].endswith('# "auto" from default')
    assert by_key["host.budget"].endswith(f'# "1GiB" from file {path}')
    assert by_key["disk.path"].endswith('# "~/.cache/kvtier" from default')
    assert by_key["disk.persist"].startswith("disk.persist = false ")
    assert by_key["disk.model_key"].startswith('disk.model_key = "" ')
    assert len({line.index("#") for line in lines}) == 1  # comments line up


def test_config_show_no_disk_tier():
    result = CliRunner().invoke(cli.main, ["config", "show"], env={"KVTIER_DISK_BUDGET": "0"})
    assert "disk.budget = 0 B (0 bytes; no disk tier)" in result.stdout
    assert '# "0" from env KVTIER_DISK_BUDGET' in result.stdout


def test_config_show_json():
    result = invoke("config", "show", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["gpu"]["budget_bytes"] == 8 * GIB
    assert data["policy"]["name"] == "sink_recent"
    assert data["sources"]["gpu.budget"] == "default"
    assert data["specs"]["host.budget"] == "50%"


def test_config_validate_ok():
    path = str(REPO / "configs" / "default.toml")
    result = invoke("config", "validate", path)
    assert result.exit_code == 0
    assert result.stdout == f"ok: {path}\n"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[host]\nbudget = "3 parsecs"\n', "host.budget = '3 parsecs' is not a size"),
        ("block_tokens = = 1\n", "is not valid TOML"),
    ],
)
def test_config_validate_error_is_one_line_exit_2(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kvtier: error: ")
    assert fragment in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_config_validate_missing_file(tmp_path):
    result = invoke("config", "validate", str(tmp_path / "nope.toml"))
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_unknown_env_var_is_one_line_exit_2():
    result = CliRunner().invoke(cli.main, ["config", "show"], env={"KVTIER_BLOCKTOKENS": "16"})
    assert result.exit_code == 2
    assert "unknown environment variable KVTIER_BLOCKTOKENS" in result.stderr


def test_log_level_debug_logs_to_stderr():
    result = invoke("--log-level", "debug", "config", "show")
    assert result.exit_code == 0
    assert "DEBUG kvtier.config: gpu.budget = 'auto' resolved to" in result.stderr


@pytest.fixture
def fake_demo(monkeypatch):
    """kvtier.demo replaced: run_demo records its arguments and returns `result`."""
    module = types.ModuleType("kvtier.demo")
    module.calls = []
    module.result = types.SimpleNamespace(tokens_match=True)

    def run_demo(**kwargs):
        module.calls.append(kwargs)
        return module.result

    module.run_demo = run_demo
    module.format_demo = lambda result: f"table (match: {result.tokens_match})"
    monkeypatch.setitem(sys.modules, "kvtier.demo", module)
    return module


def test_demo_defaults(fake_demo):
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    assert fake_demo.calls == [
        {"prompt_tokens": 3000, "new_tokens": 32, "seed": 0, "store": None, "json_path": None}
    ]
    assert result.stdout == "table (match: True)\n"


def test_demo_passes_options_and_fails_on_mismatch(fake_demo, tmp_path):
    fake_demo.result = types.SimpleNamespace(tokens_match=False)
    args = ["--tokens", "100", "--new-tokens", "4", "--seed", "7", "--store", str(tmp_path)]
    result = invoke("demo", *args, "--json", str(tmp_path / "s.json"))
    assert result.exit_code == 1
    assert "table (match: False)" in result.stdout
    (call,) = fake_demo.calls
    assert (call["prompt_tokens"], call["new_tokens"], call["seed"]) == (100, 4, 7)
    assert call["store"] == tmp_path and call["json_path"] == tmp_path / "s.json"


def test_kvtier_error_in_a_command_is_one_line_other_errors_keep_traceback(fake_demo):
    def budget_error(**kwargs):
        raise BudgetError("gpu.budget = 1 MiB cannot hold one block;\nuse at least 4 MiB")

    fake_demo.run_demo = budget_error
    result = invoke("demo")
    assert result.exit_code == 2
    expected = "kvtier: error: gpu.budget = 1 MiB cannot hold one block; use at least 4 MiB\n"
    assert result.stderr == expected

    def bug(**kwargs):
        raise RuntimeError("a bug")

    fake_demo.run_demo = bug
    result = invoke("demo")
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_python_dash_m_and_cheap_import():
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")}
    run = subprocess.run(
        [sys.executable, "-m", "kvtier", "--version"], cwd=REPO, env=env, capture_output=True
    )
    assert run.returncode == 0 and b"0.1.0" in run.stdout
    code = (
        "import sys, kvtier; assert 'torch' not in sys.modules; assert 'load_config' in dir(kvtier)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env).returncode == 0
