"""Tests for kvtier.config: layers, sizes, budgets, precedence and every error message."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import types
from pathlib import Path

import psutil
import pytest
import torch

from kvtier import config, registry, sizes
from kvtier import machine as machine_probes
from kvtier.config import load_config
from kvtier.errors import ConfigError
from kvtier.sizes import parse_size

GIB = 2**30
GPU_FREE = 10 * GIB
HOST_FREE = 20 * GIB
DISK_FREE = 100 * GIB
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def machine(monkeypatch, tmp_path):
    """A fixed machine: 10 GiB free on one CUDA GPU, 20 GiB RAM available, 100 GiB disk free."""
    for name in list(os.environ):
        if name.startswith("KVTIER_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    disk_queries: list[Path] = []

    def disk_usage(path):
        disk_queries.append(Path(path))
        return shutil._ntuple_diskusage(2 * DISK_FREE, DISK_FREE, DISK_FREE)

    memory = types.SimpleNamespace(total=32 * GIB, available=HOST_FREE)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GPU_FREE, 80 * GIB))
    return types.SimpleNamespace(home=home, disk_queries=disk_queries)


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# --- defaults and the shipped file ----------------------------------------------------------------


def test_defaults(machine):
    cfg = load_config()
    assert cfg.block_tokens == 256
    assert cfg.prefill_chunk_tokens == 4096
    assert cfg.gpu.budget_bytes == int(GPU_FREE * 0.4)
    assert cfg.host.budget_bytes == HOST_FREE // 2
    assert cfg.disk.path == machine.home / ".cache" / "kvtier"
    assert cfg.disk.budget_bytes == int(DISK_FREE * 0.8)
    assert (cfg.disk.codec, cfg.disk.persist) == ("auto", False)
    assert cfg.host.keep_pinned is True
    assert cfg.policy == config.PolicyConfig("sink_recent", 64, 1024, 1)
    assert set(cfg.sources.values()) == {"default"}
    assert list(cfg.sources) == list(config.DEFAULTS)
    assert cfg.specs["gpu.budget"] == "auto"
    assert cfg.specs["disk.path"] == "~/.cache/kvtier"


def test_default_toml_loads_to_the_defaults():
    path = REPO / "configs" / "default.toml"
    cfg = load_config(path)
    assert cfg == load_config()
    assert dict(cfg.specs) == dict(config.DEFAULTS)
    assert set(cfg.sources.values()) == {f"file {path}"}


def test_defaults_have_one_source_the_packaged_toml(tmp_path, monkeypatch):
    """Scenario: DEFAULTS, configs/default.toml and `load_config()` all come from one file."""
    packaged = Path(config.__file__).parents[1] / "data" / "default.toml"
    assert (REPO / "configs" / "default.toml").read_bytes() == packaged.read_bytes()
    assert config.default_toml() == packaged.read_text(encoding="utf-8")
    schema = {f.name for f in dataclasses.fields(config.Config)} - {"sources", "specs"}
    keys = set()
    for name in schema:
        table = getattr(config, name.capitalize() + "Config", None)
        fields = (
            [
                f.name
                for f in dataclasses.fields(table)
                if f.name not in ("settings", "spec", "devices")
            ]
            if table
            else []
        )
        keys |= {f"{name}.{f.replace('budget_bytes', 'budget')}" for f in fields} or {name}
    assert keys == set(config.DEFAULTS)
    monkeypatch.chdir(tmp_path)  # the README's snippet from any directory
    assert load_config() == load_config(packaged)


def test_config_is_frozen_and_hashable():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_tokens = 16
    assert hash(cfg) == hash(load_config())


def test_every_key_read_from_toml(tmp_path):
    store = tmp_path / "store"
    path = write(
        tmp_path,
        f"""
        block_tokens = 128
        prefill_chunk_tokens = 1000
        [gpu]
        budget = "1GiB"
        [host]
        budget = 123456
        keep_pinned = false
        [disk]
        path = "{store}"
        budget = "2 GB"
        codec = "shuffle+lz4"
        persist = true
        model_key = "org/model@abc123"
        admit_after_hits = 3
        [policy]
        name = "lru"
        module = ""
        sink_tokens = 0
        recent_tokens = 512
        prefetch_depth = 8
        [remote]
        url = "valkeys://cache1:6380"
        password_file = "pw"
        ca_file = "ca.pem"
        cert_file = "client.pem"
        key_file = "client-key.pem"
        timeout_ms = 250
        ttl_s = 3600
        hmac_key_file = "hmac.key"
        cluster = true
        persist = true
        """,
    )
    for name in ("pw", "ca.pem", "client.pem", "client-key.pem"):
        (tmp_path / name).write_text("secret\n")
    (tmp_path / "hmac.key").write_text("k" * 32)
    cfg = load_config(path)
    assert cfg.block_tokens == 128
    assert cfg.prefill_chunk_tokens == 1000
    assert cfg.gpu.budget_bytes == GIB
    assert cfg.host == config.HostConfig(123456, keep_pinned=False)
    assert cfg.disk == config.DiskConfig(
        store, 2 * 10**9, "shuffle+lz4", True, "org/model@abc123", admit_after_hits=3
    )
    assert cfg.policy == config.PolicyConfig("lru", 0, 512, 8)
    remote = cfg.remote
    assert (remote.url, remote.timeout_ms, remote.ttl_s, remote.persist) == (
        "valkeys://cache1:6380",
        250,
        3600,
        True,
    )
    assert remote.ca_file == str(tmp_path / "ca.pem") and remote.key_file.endswith("key.pem")
    assert remote.spec.tls and remote.spec.cluster and remote.spec.password == "secret"
    assert remote.spec.hmac_key == b"k" * 32 and remote.spec.ttl_s == 3600
    assert set(cfg.sources.values()) == {f"file {path}"}
    assert cfg.specs["host.budget"] == 123456
    assert not store.exists()  # loading a config never creates the store


def test_dotted_keys_in_toml_work(tmp_path):
    cfg = load_config(write(tmp_path, 'gpu.budget = "3MiB"\npolicy.name = "lfu"\n'))
    assert cfg.gpu.budget_bytes == 3 * 2**20
    assert cfg.policy.name == "lfu"


# --- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (1000, 1000),
        ("1000", 1000),
        ("0", 0),
        ("1000B", 1000),
        ("1 b", 1),
        ("1KB", 10**3),
        ("1MB", 10**6),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("64KiB", 64 * 2**10),
        ("512MiB", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1TiB", 2**40),
        ("1.5 GiB", 3 * 2**29),
        ("0.5KB", 500),
        (".25 MiB", 2**18),
        ("2.", 2),
        ("  2 gib  ", 2 * 2**30),
        ("\t512mb\n", 512 * 10**6),
        ("64KIB", 64 * 2**10),
        ("3gB", 3 * 10**9),
    ],
)
def test_parse_size_forms(text, expected):
    assert parse_size(text, key="x") == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("40%", "x = '40%' is not a size; use bytes or a size like '2GiB'"),
        ("auto", "x = 'auto' is not a size"),
        ("", "x = '' is not a size"),
        ("GiB", "x = 'GiB' is not a size"),
        ("2 parsecs", "units are B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB"),
        ("2G", "units are B, KB"),
        ("1e9", "x = '1e9' is not a size"),
        ("1,000", "x = '1,000' is not a size"),
        ("-1", "x = '-1' is negative"),
        ("-2GiB", "x = '-2GiB' is negative"),
        (-5, "x = -5 is negative"),
        (1.5, "x = 1.5 is not a size"),
        (True, "x = True is not a size"),
        (None, "x = None is not a size"),
    ],
)
def test_parse_size_rejects(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse_size(text, key="x")
    assert fragment in str(info.value)


@pytest.mark.parametrize("text", ["2GiB", 12345, "64 kib"])
def test_budget_sizes_from_toml(tmp_path, text):
    value = json.dumps(text)
    cfg = load_config(write(tmp_path, f"[host]\nbudget = {value}\n[disk]\nbudget = {value}\n"))
    assert cfg.host.budget_bytes == cfg.disk.budget_bytes == parse_size(text, key="x")


# --- percentages and auto -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fraction"),
    [("40%", 0.4), ("100%", 1.0), ("12.5%", 0.125), (" 25 % ", 0.25), ("0.5%", 0.005)],
)
def test_percent_budgets_of_each_tier(spec, fraction):
    cfg = load_config(gpu_budget=spec, host_budget=spec, disk_budget=spec)
    assert cfg.gpu.budget_bytes == int(GPU_FREE * fraction)
    assert cfg.host.budget_bytes == int(HOST_FREE * fraction)
    assert cfg.disk.budget_bytes == int(DISK_FREE * fraction)


def test_auto_budgets_of_each_tier():
    cfg = load_config(gpu_budget="auto", host_budget="AUTO", disk_budget=" Auto ")
    assert cfg.gpu.budget_bytes == int(GPU_FREE * 0.4)
    assert cfg.host.budget_bytes == HOST_FREE // 2
    assert cfg.disk.budget_bytes == int(DISK_FREE * 0.8)
    assert cfg.specs["host.budget"] == "AUTO"


def test_gpu_percent_uses_nvml_when_torch_has_no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import pynvml

    handle = object()
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: None)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda index: handle)
    memory = types.SimpleNamespace(free=6 * GIB, total=8 * GIB)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: memory)
    assert machine_probes.free_gpu_bytes() == 6 * GIB
    assert load_config(gpu_budget="50%").gpu.budget_bytes == 3 * GIB


def test_gpu_percent_is_of_host_ram_without_any_gpu(monkeypatch):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    assert machine_probes.free_gpu_bytes() == HOST_FREE
    assert load_config().gpu.budget_bytes == int(HOST_FREE * 0.4)


def test_disk_percent_is_measured_at_nearest_existing_parent(tmp_path, machine):
    store = tmp_path / "a" / "b" / "store"
    cfg = load_config(disk_path=store, disk_budget="10%")
    assert cfg.disk.budget_bytes == DISK_FREE // 10
    assert machine.disk_queries == [tmp_path]
    assert not (tmp_path / "a").exists()
    assert machine_probes.nearest_existing(store) == tmp_path


def test_disk_budget_zero_means_no_disk_tier():
    assert load_config(disk_budget=0).disk.budget_bytes == 0
    assert load_config(disk_budget="0 GiB").disk.budget_bytes == 0


def test_percent_resolving_to_zero_disk_warns(monkeypatch, caplog):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    assert load_config(disk_budget="50%").disk.budget_bytes == 0
    assert "running without a disk tier" in caplog.text


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        (
            "[gpu]\nbudgte = 1\n",
            ["unknown key 'gpu.budgte'", "did you mean 'budget'?", "takes: budget"],
        ),
        ("blok_tokens = 256\n", ["unknown key 'blok_tokens'", "did you mean 'block_tokens'?"]),
        ("[gpus]\nbudget = 1\n", ["unknown table 'gpus'", "did you mean 'gpu'?", "[policy]"]),
        ("gpu = 5\n", ["gpu = 5 is not a table; write [gpu] with keys budget"]),
        (
            'block_tokens = "x"\n',
            ["block_tokens = 'x' is not a positive multiple of 16 (e.g. 256)"],
        ),
        ("block_tokens = 100\n", ["block_tokens = 100 is not a positive multiple of 16"]),
        ("block_tokens = 0\n", ["block_tokens = 0 is not a positive multiple of 16"]),
        ("block_tokens = -16\n", ["block_tokens = -16 is not a positive multiple of 16"]),
        ("block_tokens = 256.0\n", ["block_tokens = 256.0 is not a positive multiple of 16"]),
        ("block_tokens = true\n", ["block_tokens = True is not a positive multiple of 16"]),
        ("prefill_chunk_tokens = 0\n", ["prefill_chunk_tokens = 0 is not a positive integer"]),
        ("[disk]\npersist = 3\n", ["disk.persist = 3 is not a boolean; use true or false"]),
        ('[disk]\npersist = "yes"\n', ["disk.persist = 'yes' is not a boolean"]),
        ("[host]\nkeep_pinned = 1\n", ["host.keep_pinned = 1 is not a boolean; use true or false"]),
        ("[disk]\nmodel_key = 3\n", ["disk.model_key = 3 is not a model name", "'org/model@rev'"]),
        (
            '[host]\nbudget = "3 parsecs"\n',
            ["host.budget = '3 parsecs' is not a size; use bytes, '2GiB', '40%' or 'auto'"],
        ),
        ("[host]\nbudget = 1.5e9\n", ["host.budget = 1500000000.0 is not a size"]),
        ("[host]\nbudget = -1\n", ["host.budget = -1 is negative"]),
        ('[disk]\nbudget = "-1GiB"\n', ["disk.budget = '-1GiB' is negative"]),
        ('[host]\nbudget = "0%"\n', ["host.budget = '0%' is not a percentage above 0%"]),
        ('[gpu]\nbudget = "101%"\n', ["gpu.budget = '101%' is not a percentage", "at most 100%"]),
        ('[gpu]\nbudget = "-5%"\n', ["gpu.budget = '-5%' is not a percentage"]),
        ('[gpu]\nbudget = "%"\n', ["gpu.budget = '%' is not a size"]),
        ('[disk]\nbudget = "0%"\n', ["disk.budget = 0 turns the disk tier off"]),
        (
            "[gpu]\nbudget = 0\n",
            ["gpu.budget = 0 resolves to 0 bytes", "only disk.budget may be 0"],
        ),
        ('[host]\nbudget = "0 GiB"\n', ["host.budget = '0 GiB' resolves to 0 bytes", "'2GiB'"]),
        (
            '[disk]\ncodec = "zstd"\n',
            ["disk.codec = 'zstd' is not a codec", "raw, lz4, shuffle+lz4"],
        ),
        ("[disk]\npath = 3\n", ["disk.path = 3 is not a path"]),
        ('[disk]\npath = ""\n', ["disk.path = '' is not a path"]),
        (
            '[policy]\nname = "fifo"\n',
            [
                "policy.name = 'fifo' is not a registered policy; registered:",
                "sink_recent",
                "register yours with kvtier.register_policy(name) before load_config",
            ],
        ),
        ("[policy]\nsink_tokens = -1\n", ["policy.sink_tokens = -1 is not an integer >= 0"]),
        ("[policy]\nrecent_tokens = -1\n", ["policy.recent_tokens = -1 is not an integer >= 0"]),
        (
            "[policy]\nprefetch_depth = 9\n",
            ["policy.prefetch_depth = 9 is not an integer from 0 to 8"],
        ),
        ("[policy]\nprefetch_depth = -1\n", ["policy.prefetch_depth = -1 is not an integer"]),
        ("[policy.extra]\nx = 1\n", ["unknown key 'policy.extra'"]),
        ("[block_tokens]\nx = 1\n", ["block_tokens = {'x': 1} is not a positive multiple of 16"]),
    ],
)
def test_bad_toml_values(tmp_path, toml, fragments):
    path = write(tmp_path, toml)
    message = config_error(path)
    for fragment in fragments:
        assert fragment in message
    assert message.endswith(f"(from file {path})")


def test_gpu_percent_of_nothing_free_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 80 * GIB))
    message = config_error()
    assert "gpu.budget = 'auto' resolves to 0 bytes (40% of 0 bytes free)" in message
    assert "(from" not in message  # a default has no source to name


def test_disk_path_that_is_a_file(tmp_path):
    file = write(tmp_path, "", name="not-a-dir")
    assert f"disk.path = '{file}' is a file; use a directory (from override)" in config_error(
        disk_path=file
    )
    assert load_config(disk_path=file, disk_budget=0).disk.budget_bytes == 0


def test_missing_file(tmp_path):
    message = config_error(tmp_path / "nope.toml")
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in message
    assert "configs/default.toml" in message


def test_directory_instead_of_file(tmp_path):
    assert f"cannot read config file {tmp_path}" in config_error(tmp_path)


def test_toml_syntax_error(tmp_path):
    path = write(tmp_path, "block_tokens = = 3\n")
    message = config_error(path)
    assert f"config file {path} is not valid TOML" in message
    assert "line 1" in message


def test_builtin_policy_names_are_known_without_importing_the_policy_package(monkeypatch):
    """Scenario: config sits below the policies; it knows the built-in names from the registry
    (the chosen policy's module is imported through the registry only to read its settings)."""
    monkeypatch.setitem(sys.modules, "kvtier.policy", None)  # any import of it would fail
    assert registry.registered_policies() == ["lfu", "lru", "sink_recent"]
    message = config_error(policy_name="fifo")
    assert "registered: lfu, lru, sink_recent;" in message


def test_registered_policy_from_registry_is_accepted(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {})
    registry.register_policy("mine")(object)
    assert load_config(policy_name="mine").policy.name == "mine"
    assert "registered: lfu, lru, mine, sink_recent;" in config_error(policy_name="fifo")


# --- environment ----------------------------------------------------------------------------------


def test_every_env_var(monkeypatch, tmp_path):
    values = {
        "KVTIER_BLOCK_TOKENS": "64",
        "KVTIER_PREFILL_CHUNK_TOKENS": " 2048 ",
        "KVTIER_GPU_BUDGET": "1GiB",
        "KVTIER_HOST_BUDGET": "1000",
        "KVTIER_HOST_KEEP_PINNED": "no",
        "KVTIER_DISK_PATH": str(tmp_path / "s"),
        "KVTIER_DISK_BUDGET": "10%",
        "KVTIER_DISK_CODEC": "lz4",
        "KVTIER_DISK_PERSIST": "yes",
        "KVTIER_DISK_MODEL_KEY": "m@1",
        "KVTIER_DISK_ADMIT_AFTER_HITS": "2",
        "KVTIER_POLICY_NAME": "lfu",
        "KVTIER_POLICY_MODULE": "json",  # any importable module; this one registers nothing
        "KVTIER_POLICY_SINK_TOKENS": "0",
        "KVTIER_POLICY_RECENT_TOKENS": "16",
        "KVTIER_POLICY_PREFETCH_DEPTH": "2",
        "KVTIER_REMOTE_URL": "valkey://cache1:6379",
        "KVTIER_REMOTE_PASSWORD_FILE": str(tmp_path / "pw"),
        "KVTIER_REMOTE_CA_FILE": "",  # empty: unset, like every KVTIER_* variable
        "KVTIER_REMOTE_CERT_FILE": "",
        "KVTIER_REMOTE_KEY_FILE": "",
        "KVTIER_REMOTE_TIMEOUT_MS": "750",
        "KVTIER_REMOTE_TTL_S": "60",
        "KVTIER_REMOTE_HMAC_KEY_FILE": "",
        "KVTIER_REMOTE_CLUSTER": "yes",
        "KVTIER_REMOTE_PERSIST": "1",
        "KVTIER_LOG_LEVEL": "DEBUG",  # the CLI's, not a config key: ignored here
    }
    (tmp_path / "pw").write_text("hunter2\n")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    cfg = load_config()
    assert (cfg.block_tokens, cfg.prefill_chunk_tokens) == (64, 2048)
    assert (cfg.gpu.budget_bytes, cfg.host.budget_bytes) == (GIB, 1000)
    assert cfg.host.keep_pinned is False
    assert cfg.disk == config.DiskConfig(tmp_path / "s", DISK_FREE // 10, "lz4", True, "m@1", 2)
    assert cfg.policy == config.PolicyConfig("lfu", 0, 16, 2, module="json")
    assert cfg.sources["disk.persist"] == "env KVTIER_DISK_PERSIST"
    assert (cfg.remote.timeout_ms, cfg.remote.ttl_s, cfg.remote.cluster) == (750, 60, True)
    assert cfg.remote.persist and cfg.remote.spec.password == "hunter2"
    assert cfg.specs["block_tokens"] == "64"
    assert set(config.ENV_VARS) == set(values) - {"KVTIER_LOG_LEVEL"}


@pytest.mark.parametrize(
    ("word", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("No", False)],
)
def test_env_booleans(monkeypatch, word, expected):
    monkeypatch.setenv("KVTIER_DISK_PERSIST", word)
    assert load_config().disk.persist is expected


def test_empty_env_var_counts_as_unset(monkeypatch):
    monkeypatch.setenv("KVTIER_BLOCK_TOKENS", "")
    cfg = load_config()
    assert (cfg.block_tokens, cfg.sources["block_tokens"]) == (256, "default")


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("KVTIER_BLOCK_TOKENS", "x", "block_tokens = 'x' is not a positive multiple of 16"),
        ("KVTIER_DISK_PERSIST", "maybe", "use true/false, 1/0 or yes/no"),
        ("KVTIER_HOST_BUDGET", "3 parsecs", "host.budget = '3 parsecs' is not a size"),
        ("KVTIER_POLICY_PREFETCH_DEPTH", "1.5", "policy.prefetch_depth = '1.5' is not an integer"),
    ],
)
def test_bad_env_values_name_the_variable(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    message = config_error()
    assert fragment in message
    assert message.endswith(f"(from env {name})")


def test_unknown_env_var(monkeypatch):
    monkeypatch.setenv("KVTIER_GPU_BUDGE", "1GiB")
    message = config_error()
    assert "unknown environment variable KVTIER_GPU_BUDGE" in message
    assert "did you mean 'KVTIER_GPU_BUDGET'?" in message


# --- overrides ------------------------------------------------------------------------------------


def test_every_flat_override(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("pw")
    cfg = load_config(
        block_tokens=32,
        prefill_chunk_tokens=7,
        gpu_budget="1MiB",
        host_budget=2**21,
        host_keep_pinned=True,
        disk_path=tmp_path,
        disk_budget="1KB",
        disk_codec="raw",
        disk_persist=True,
        disk_model_key="m@2",
        disk_admit_after_hits=0,
        policy_name="lru",
        policy_module="",
        policy_sink_tokens=1,
        policy_recent_tokens=2,
        policy_prefetch_depth=0,
        remote_url="valkey://h:1",
        remote_password_file=str(pw),
        remote_ca_file="",
        remote_cert_file="",
        remote_key_file="",
        remote_timeout_ms=9,
        remote_ttl_s=0,
        remote_hmac_key_file="",
        remote_cluster=False,
        remote_persist=True,
    )
    assert cfg.remote.spec.timeout_ms == 9 and cfg.remote.spec.password == "pw"
    assert (cfg.block_tokens, cfg.prefill_chunk_tokens) == (32, 7)
    assert (cfg.gpu.budget_bytes, cfg.host.budget_bytes) == (2**20, 2**21)
    assert cfg.disk == config.DiskConfig(tmp_path, 1000, "raw", True, "m@2")
    assert cfg.policy == config.PolicyConfig("lru", 1, 2, 0)
    assert set(cfg.sources.values()) == {"override"}
    assert cfg.specs["disk.path"] == str(tmp_path)


def test_unknown_override():
    message = config_error(gpu_budge="1GiB")
    assert "unknown override 'gpu_budge'; did you mean 'gpu_budget'?" in message
    assert "host_keep_pinned" in message and "policy_<key>" in message
    assert "did you mean 'policy_prefetch_depth'" in config_error(policy_prefech_depth=1)


def test_table_overrides_and_none():
    cfg = load_config(
        gpu={"budget": "1GiB"}, policy={"name": "lfu", "sink_tokens": None}, seed=None
    )
    assert (cfg.gpu.budget_bytes, cfg.policy.name, cfg.policy.sink_tokens) == (GIB, "lfu", 64)
    assert cfg.sources["policy.sink_tokens"] == "default"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"gpu": {"budgte": 1}}, "unknown key 'gpu.budgte'"),
        ({"gpu": "1GiB"}, "gpu = '1GiB' is not a table"),
        ({"block_tokens": "256"}, "block_tokens = '256' is not a positive multiple of 16"),
        ({"disk_persist": "true"}, "disk.persist = 'true' is not a boolean; use true or false"),
    ],
)
def test_bad_overrides(overrides, fragment):
    message = config_error(**overrides)
    assert fragment in message
    assert message.endswith("(from override)")


# --- precedence, with_overrides, to_dict ----------------------------------------------------------


def test_precedence_default_file_env_override(monkeypatch, tmp_path):
    path = write(
        tmp_path, '[gpu]\nbudget = "1GiB"\n[host]\nbudget = "1GiB"\n[disk]\nbudget = "1GiB"\n'
    )
    monkeypatch.setenv("KVTIER_HOST_BUDGET", "2GiB")
    monkeypatch.setenv("KVTIER_DISK_BUDGET", "2GiB")
    cfg = load_config(path, disk_budget="3GiB")
    assert cfg.block_tokens == 256 and cfg.sources["block_tokens"] == "default"
    assert cfg.gpu.budget_bytes == GIB and cfg.sources["gpu.budget"] == f"file {path}"
    assert cfg.host.budget_bytes == 2 * GIB
    assert cfg.sources["host.budget"] == "env KVTIER_HOST_BUDGET"
    assert cfg.disk.budget_bytes == 3 * GIB and cfg.sources["disk.budget"] == "override"
    assert cfg.specs["disk.budget"] == "3GiB"


def test_with_overrides_keeps_sources_and_remeasures(monkeypatch, tmp_path):
    path = write(tmp_path, '[host]\nbudget = "10%"\n')
    monkeypatch.setenv("KVTIER_BLOCK_TOKENS", "64")
    cfg = load_config(path)
    monkeypatch.setenv("KVTIER_BLOCK_TOKENS", "32")  # not read again: env was a layer of cfg
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=GIB))
    again = cfg.with_overrides(gpu_budget="5MiB")
    assert again.gpu.budget_bytes == 5 * 2**20 and again.sources["gpu.budget"] == "override"
    assert again.host.budget_bytes == GIB // 10 and again.sources["host.budget"] == f"file {path}"
    assert again.block_tokens == 64 and again.sources["block_tokens"] == "env KVTIER_BLOCK_TOKENS"
    assert cfg.gpu.budget_bytes == int(GPU_FREE * 0.4)  # the original is unchanged
    with pytest.raises(ConfigError, match="unknown override 'nope'"):
        cfg.with_overrides(nope=1)


def test_with_overrides_on_a_hand_built_config(tmp_path):
    cfg = config.Config(
        16,
        16,
        config.GpuConfig(1),
        config.HostConfig(2),
        config.DiskConfig(tmp_path, 0, "raw", False),
        config.PolicyConfig("lru", 0, 0, 0),
    )
    assert cfg.with_overrides(block_tokens=32) == dataclasses.replace(cfg, block_tokens=32)


def test_relative_disk_path_is_relative_to_the_file_or_cwd(monkeypatch, tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, '[disk]\npath = "../store"\n')
    assert load_config(path).disk.path == tmp_path / "store"
    monkeypatch.chdir(sub)
    assert load_config(disk_path="store").disk.path == sub / "store"


def test_to_dict_is_json_ready():
    data = json.loads(json.dumps(load_config(host_budget=1000).to_dict()))
    assert data["host"] == {"budget_bytes": 1000, "keep_pinned": True}
    assert data["disk"]["path"].endswith("/.cache/kvtier")
    assert data["sources"]["host.budget"] == "override"
    assert data["specs"]["gpu.budget"] == "auto"
    assert set(data) == {
        "block_tokens",
        "prefill_chunk_tokens",
        "gpu",
        "host",
        "disk",
        "policy",
        "remote",
    } | {
        "sources",
        "specs",
    }


def test_format_size():
    assert sizes.format_size(512) == "512 B"
    assert sizes.format_size(3435973836) == "3.20 GiB"
    assert sizes.format_size(2**40) == "1.00 TiB"


def test_to_toml_round_trips_settings_and_odd_strings(monkeypatch, tmp_path):
    """Scenario: what `config show` prints loads back to the same Config, odd characters too."""
    import tomllib

    monkeypatch.setattr(registry, "_REGISTRY", {})

    @registry.register_policy("odd name-v2")
    class Odd:
        settings = {"label": "x", "scale": 1.0, "window": 4, "strict": False}

    odd = {"label": 'a"b\\c\x7f\n\ttab é', "scale": 2.5e-7, "window": 2**40, "strict": True}
    cfg = load_config(
        disk_path=tmp_path / "kv store\x1b",
        policy={"name": "odd name-v2", "odd name-v2": odd},
    )
    text = config.to_toml(cfg)
    data = tomllib.loads(text)
    assert data["policy"]["odd name-v2"] == odd
    assert all(line.isprintable() for line in text.splitlines())
    path = write(tmp_path, text, name="shown.toml")
    assert load_config(path) == cfg


def test_remote_table_round_trips_through_config_show(tmp_path):
    """Scenario: `config show` of a config with a remote tier loads back to the same Config
    (a cluster url's resolved cluster = true too), and no secret is printed."""
    import tomllib

    (tmp_path / "pw").write_text("hunter2\n")
    cfg = load_config(
        remote={"url": "valkey://a:1,b:2", "password_file": str(tmp_path / "pw"), "ttl_s": 60}
    )
    text = config.to_toml(cfg)
    assert "hunter2" not in text and tomllib.loads(text)["remote"]["cluster"] is True
    path = tmp_path / "shown.toml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert load_config().remote == config.RemoteConfig()  # url "": no remote tier


# --- [gpu.devices] ---------------------------------------------------------------------------------
def test_gpu_devices_override_the_budget_per_device(tmp_path):
    """Scenario: [gpu.devices] in a file, a --set style table override on top; percentages of
    that device's free memory; the table survives with_overrides and config show."""
    from kvtier.config.render import to_toml

    path = tmp_path / "kv.toml"
    path.write_text('[gpu]\nbudget = "1GiB"\n[gpu.devices]\n"cpu:1" = "2GiB"\ncpu = "10%"\n')
    cfg = load_config(path, gpu={"devices": {"cpu:2": 4096}})
    assert cfg.gpu.budget_bytes == 1 << 30
    assert cfg.gpu.devices["cpu:1"] == 2 << 30 and cfg.gpu.devices["cpu:2"] == 4096
    assert 0 < cfg.gpu.devices["cpu"] < 2**63
    assert cfg.sources["gpu.devices.cpu:2"] == "override"
    assert cfg.with_overrides(host_budget="1GiB").gpu.devices["cpu:1"] == 2 << 30
    assert cfg.to_dict()["gpu"]["devices"]["cpu:1"] == 2 << 30
    again = tmp_path / "shown.toml"
    again.write_text(to_toml(cfg))
    assert dict(load_config(again).gpu.devices) == {
        "cpu": cfg.gpu.devices["cpu"],
        "cpu:1": 2 << 30,
        "cpu:2": 4096,
    }


@pytest.mark.parametrize(
    ("devices", "fragment"),
    [
        ({"cuda": "1GiB"}, "unknown device 'cuda' in [gpu.devices]; name a device with its index"),
        ({"gpu1": "1GiB"}, "unknown device 'gpu1' in [gpu.devices]"),
        ({"cpu:1": "3 parsecs"}, "gpu.devices.cpu:1 = '3 parsecs' is not a size"),
        ({"cpu:1": 0}, "gpu.devices.cpu:1 = 0 resolves to 0 bytes"),
        ({"cpu:1": "0%"}, "is not a percentage above 0%"),
        ({"cuda:7": "40%"}, "this machine has no cuda:7 to measure; give a size"),
        ("4GiB", "gpu.devices = '4GiB' is not a table"),
    ],
)
def test_bad_gpu_devices_are_one_line_errors(devices, fragment):
    with pytest.raises(ConfigError) as raised:
        load_config(None, gpu={"devices": devices})
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_gpu_devices_from_set_flags():
    from kvtier.cli.common import parse_sets

    overrides = parse_sets(["gpu.devices.cpu:1=2GiB", "gpu.budget=1GiB"])
    assert load_config(None, **overrides).gpu.devices == {"cpu:1": 2 << 30}


def test_admit_after_hits_needs_a_persistent_target():
    """disk.admit_after_hits counts reuses before a block goes to disk or to the server: with
    neither persisting it would mean nothing, so it is a one-line error; either one is enough."""
    message = config_error(None, disk={"admit_after_hits": 2})
    assert "disk.persist" in message and "remote.persist" in message and "\n" not in message
    remote = {"url": "valkey://127.0.0.1:6379", "persist": True}
    assert load_config(None, disk={"admit_after_hits": 2}, remote=remote).disk.admit_after_hits == 2
    on_disk = load_config(None, disk={"admit_after_hits": 1, "persist": True})
    assert on_disk.disk.admit_after_hits == 1
