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


def test_info_warns_about_a_stray_env_var_and_goes_on(monkeypatch):
    """Scenario: a stray KVTIER_* variable made `kvtier info` fail with a 520-character error."""
    monkeypatch.setenv("KVTIER_GPU_BUDGE", "1GiB")
    monkeypatch.setenv("KVTIER_HOST_BUDGET", "1GiB")
    result = invoke("info")
    assert result.exit_code == 0, result.output
    warning = (
        "config: warning: ignoring unknown environment variable KVTIER_GPU_BUDGE; did you mean "
        "'KVTIER_GPU_BUDGET'? unset it or fix its name"
    )
    assert warning in result.stdout
    assert "budgets: gpu 8.00 GiB, host 1.00 GiB, disk 80.00 GiB" in result.stdout
    assert all(len(line) < 200 for line in result.stdout.splitlines())


def test_config_show_text(tmp_path):
    """Scenario: `config show` printed `gpu.budget = 8.00 GiB (...)`, which is not TOML; it now
    prints TOML, sizes in bytes, with what was written and its source in a comment."""
    path = tmp_path / "cfg.toml"
    path.write_text('[host]\nbudget = "1GiB"\n')
    result = invoke("config", "show", str(path))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if " = " in line]
    assert len(lines) == 26  # every key: host.keep_pinned, policy.module, disk.model_key, [remote]
    assert lines[0].startswith("block_tokens = 256 ") and lines[0].endswith("# from default")
    gpu, host, disk = (line for line in lines if line.startswith("budget = "))
    assert gpu.startswith("budget = 8589934592 ") and gpu.endswith(
        '# 8.00 GiB; "auto" from default'
    )
    assert host.startswith("budget = 1073741824 ")
    assert host.endswith(f'# 1.00 GiB; "1GiB" from file {path}')
    assert disk.endswith('# 80.00 GiB; "80%" from default')
    by_key = {line.split(" = ")[0]: line for line in lines}
    assert by_key["path"].endswith('# "~/.cache/kvtier" from default')
    assert by_key["persist"].startswith("persist = false ")
    assert by_key["model_key"].startswith('model_key = "" ')
    assert len({line.index("#") for line in lines}) == 1  # comments line up
    assert "\n[gpu]\n" in result.stdout and "\n[policy]\n" in result.stdout


def test_config_show_prints_toml_that_loads_back_to_the_same_config(tmp_path, monkeypatch):
    """Scenario: the output of `config show` parses with tomllib and loads to the same Config."""
    import tomllib

    from kvtier.config import load_config

    path = tmp_path / "cfg.toml"
    path.write_text(
        'block_tokens = 128\n[disk]\npath = "store \\"quoted\\"\\tdir"\ncodec = "lz4"\n'
        '[policy]\nname = "lfu"\nprefetch_depth = 2\n'
    )
    monkeypatch.setenv("KVTIER_HOST_BUDGET", "25%")
    result = invoke("config", "show", str(path))
    assert result.exit_code == 0, result.output
    data = tomllib.loads(result.stdout)
    assert data["disk"]["path"] == str(tmp_path / 'store "quoted"\tdir')
    assert data["host"]["budget"] == 5 * GIB
    shown = tmp_path / "shown.toml"
    shown.write_text(result.stdout)
    assert load_config(shown) == load_config(path)


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


def test_config_init_writes_the_documented_defaults(tmp_path):
    path = tmp_path / "my.toml"
    result = invoke("config", "init", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {path}\n"
    assert path.read_text() == (REPO / "configs" / "default.toml").read_text()
    assert invoke("config", "validate", str(path)).exit_code == 0


def test_config_init_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text("block_tokens = 16\n")
    result = invoke("config", "init", str(path))
    assert result.exit_code == 2
    assert (
        result.stderr == f"kvtier: error: {path} exists; pass --force to overwrite it, or "
        "choose another path\n"
    )
    assert path.read_text() == "block_tokens = 16\n"
    assert invoke("config", "init", "--force", str(path)).exit_code == 0
    assert path.read_text().startswith("# kvtier defaults")
    missing = tmp_path / "no" / "such" / "dir.toml"
    result = invoke("config", "init", str(missing))
    assert result.exit_code == 2 and "does not exist; create it" in result.stderr


def test_unknown_env_var_is_one_line_exit_2():
    result = CliRunner().invoke(cli.main, ["config", "show"], env={"KVTIER_BLOCKTOKENS": "16"})
    assert result.exit_code == 2
    assert "unknown environment variable KVTIER_BLOCKTOKENS" in result.stderr


def test_log_level_debug_logs_to_stderr():
    result = invoke("--log-level", "debug", "config", "show")
    assert result.exit_code == 0
    assert "DEBUG kvtier.config: gpu.budget = 'auto' resolved to" in result.stderr


def test_an_invocation_leaves_the_kvtier_logger_as_it_found_it():
    """Scenario: main() logs through a handler of its own for one invocation: afterwards (also
    after an error exit) the `kvtier` logger has no CLI handler and its level is back, so
    several invocations in one process (click's test runner, a notebook) never stack them."""
    logger = logging.getLogger("kvtier")
    before = (list(logger.handlers), logger.level)
    assert invoke("--log-level", "debug", "config", "show").exit_code == 0
    assert (list(logger.handlers), logger.level) == before
    bad = CliRunner().invoke(cli.main, ["config", "show"], env={"KVTIER_BLOCKTOKENS": "16"})
    assert bad.exit_code == 2
    assert (list(logger.handlers), logger.level) == before


@pytest.fixture
def fake_demo(monkeypatch):
    """kvtier.demo replaced: run_demo and run_tiny_demo record their arguments, return `result`."""
    module = types.ModuleType("kvtier.demo")
    module.calls = []
    module.result = types.SimpleNamespace(tokens_match=True)

    def recorder(name):
        def run(**kwargs):
            module.calls.append((name, kwargs))
            return module.result

        return run

    module.run_demo = recorder("real")
    module.run_tiny_demo = recorder("tiny")
    module.format_demo = lambda result: f"real table (match: {result.tokens_match})"
    module.format_tiny_demo = lambda result: f"tiny table (match: {result.tokens_match})"
    monkeypatch.setitem(sys.modules, "kvtier.demo", module)
    return module


def test_demo_defaults_to_the_real_model(fake_demo):
    result = invoke("demo")
    assert result.exit_code == 0, result.output
    assert fake_demo.calls == [("real", {"new_tokens": 24, "store": None, "json_path": None})]
    assert result.stdout == "real table (match: True)\n"


def test_demo_tiny_keeps_the_random_model_and_its_options(fake_demo, tmp_path):
    assert invoke("demo", "--tiny").exit_code == 0
    assert fake_demo.calls[-1] == (
        "tiny",
        {"prompt_tokens": 3000, "new_tokens": 32, "seed": 0, "store": None, "json_path": None},
    )
    fake_demo.result = types.SimpleNamespace(tokens_match=False)
    args = ["--tokens", "100", "--new-tokens", "4", "--seed", "7", "--store", str(tmp_path)]
    result = invoke("demo", "--tiny", *args, "--json", str(tmp_path / "s.json"))
    assert result.exit_code == 1
    assert "tiny table (match: False)" in result.stdout
    name, call = fake_demo.calls[-1]
    assert (call["prompt_tokens"], call["new_tokens"], call["seed"]) == (100, 4, 7)
    assert call["store"] == tmp_path and call["json_path"] == tmp_path / "s.json"


def test_demo_options_of_the_random_model_need_tiny(fake_demo):
    result = invoke("demo", "--tokens", "100")
    assert result.exit_code == 2 and "add --tiny" in result.stderr
    assert fake_demo.calls == []


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
