"""Configs that never crash: a corpus of malformed input, and hypothesis junk, give only ConfigError.

Every bad TOML file, override, path argument or KVTIER_* variable must raise ConfigError whose
message is one line naming the key, the value and the fix; `kvtier config validate` exits 2.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import psutil
import pytest
import torch
from click.testing import CliRunner

from kvtier import cli
from kvtier.config import load_config, resolve
from kvtier.errors import ConfigError
from kvtier.sizes import format_size

GIB = 2**30
GPU_FREE, HOST_FREE, DISK_FREE = 10 * GIB, 20 * GIB, 100 * GIB
MAX_MESSAGE = 400  # one line a person reads, not a dump of every key


@pytest.fixture(autouse=True)
def machine(monkeypatch, tmp_path):
    """10 GiB free on one CUDA GPU, 20 GiB RAM available, 100 GiB disk free, no KVTIER_* set."""
    for name in list(os.environ):
        if name.startswith("KVTIER_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    memory = types.SimpleNamespace(total=32 * GIB, available=HOST_FREE)
    usage = shutil._ntuple_diskusage(2 * DISK_FREE, DISK_FREE, DISK_FREE)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GPU_FREE, 80 * GIB))
    return home


def one_line_error(*args, **kwargs) -> str:
    """The ConfigError message of load_config(*args, **kwargs), checked to be one short line."""
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE, message
    return message


NESTED_ARRAYS = "[gpu]\nbudget = " + "[" * 3000 + "]" * 3000 + "\n"
NESTED_TABLES = "[gpu]\nbudget = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n"

# (id, TOML text, fragment of the message). Each failed before issue 11 with a traceback, a
# 500-character message, or not at all.
BAD_TOML = [
    ("nested arrays", NESTED_ARRAYS, "nests arrays or tables too deeply"),
    ("nested tables", NESTED_TABLES, "nests arrays or tables too deeply"),
    ("5000-digit int", "[host]\nbudget = " + "1" * 5000, "holds an integer too long"),
    ("5000-digit size", f'[host]\nbudget = "{"1" * 5000}"', "is more than 8 EiB"),
    ("400-digit TiB", f'[disk]\nbudget = "{"9" * 400}TiB"', "is more than 8 EiB"),
    ("over 8 EiB", "[host]\nbudget = 9223372036854775808", "is more than 8 EiB"),
    ("no such user", '[disk]\npath = "~nosuchuser/kv"', "there is no user 'nosuchuser'"),
    ("NUL in path", '[disk]\npath = "kv\\u0000store"', "disk.path = 'kv\\x00store' contains a NUL"),
    ("full-width", '[host]\nbudget = "１６GiB"', "'１６GiB' is not a size"),
    ("Arabic-Indic", '[host]\nbudget = "١٦GiB"', "(write the digits as ASCII 0-9)"),
    ("underscore", '[host]\nbudget = "1_6"', "host.budget = '1_6' is not a size"),
    ("underscore %", '[host]\nbudget = "1_6%"', "host.budget = '1_6%' is not a size"),
    ("host > RAM", '[host]\nbudget = "10TiB"', "is 10.00 TiB, more than the 20.00 GiB of avail"),
    ("gpu > GPU", '[gpu]\nbudget = "11GiB"', "more than the 10.00 GiB of free GPU memory"),
    ("disk > free", '[disk]\nbudget = "101GiB"', "more than the 100.00 GiB of disk free for"),
    ("huge tokens", "block_tokens = 4398046511104", "is more than 2147483648 tokens"),
    ("huge chunk", "prefill_chunk_tokens = " + "9" * 4000, "is more than 2147483648 tokens"),
    (
        "huge sinks",
        "[policy]\nsink_tokens = " + "9" * 30,
        "sink_tokens = 999999999999999999999999999999 is more",
    ),
    ("deep budget", "[gpu]\nbudget = [[[[[1]]]]]", "gpu.budget = [[[[...]]]] is not a size"),
    ("list codec", "[disk]\ncodec = ['lz4']", "disk.codec = ['lz4'] is not a codec"),
    ("table path", "[disk]\npath = {a = 1}", "disk.path = {'a': 1} is not a path"),
    ("float inf", "[host]\nbudget = inf", "host.budget = inf is not a size"),
    ("array table", "[[gpu]]\nbudget = 1", "gpu = [{'budget': 1}] is not a table"),
    ("long key", "x" * 5000 + " = 1", "unknown key 'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxx"),
    ("remote scheme", '[remote]\nurl = "redis://h:1"', "does not start with valkey://"),
    ("remote int url", "[remote]\nurl = 6379", "remote.url = 6379 is not a URL"),
    ("remote port", '[remote]\nurl = "valkey://h:99999"', "has port '99999'; use a number"),
    ("remote timeout 0", '[remote]\nurl = "valkey://h"\ntimeout_ms = 0', "remote.timeout_ms = 0"),
    ("remote ttl -1", '[remote]\nurl = "valkey://h"\nttl_s = -1', "remote.ttl_s = -1 is not"),
    ("remote cluster str", '[remote]\nurl = "valkey://h"\ncluster = "yes"', "not a boolean"),
    ("remote persist no url", "[remote]\npersist = true", "remote.persist is set but remote.url"),
    (
        "remote cluster off",
        '[remote]\nurl = "valkey://a:1,b:2"\ncluster = false',
        "remote.cluster = false but remote.url",
    ),
    (
        "remote no pw file",
        '[remote]\nurl = "valkey://h"\npassword_file = "nope.txt"',
        "remote.password_file = ",
    ),
    (
        "remote ca plain",
        '[remote]\nurl = "valkey://h"\nca_file = "bad.toml"',
        "remote.ca_file = ",
    ),
    (
        "remote pw in url",
        '[remote]\nurl = "valkey://u:s3cret@h"\npassword_file = "bad.toml"',
        "***",
    ),
    ("remote typo", '[remote]\nurll = "valkey://h"', "unknown key"),
]


@pytest.mark.parametrize(
    ("toml", "fragment"), [c[1:] for c in BAD_TOML], ids=[c[0] for c in BAD_TOML]
)
def test_malformed_toml_is_one_config_error_line(tmp_path, toml, fragment):
    """Scenario: each malformed file is one ConfigError line, and `config validate` exits 2."""
    path = tmp_path / "bad.toml"
    path.write_text(toml, encoding="utf-8")
    assert fragment in one_line_error(path)
    for command in ("validate", "show"):
        result = CliRunner().invoke(cli.main, ["config", command, str(path)])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("kvtier: error: ") and result.stderr.count("\n") == 1
        assert fragment in result.stderr and result.stdout == ""


# (id, overrides, fragment)
BAD_OVERRIDES = [
    ("int key", {"gpu": {1: "2GiB"}}, "unknown key 1 in [gpu]; [gpu] takes: budget"),
    ("huge int", {"gpu_budget": 10**5000}, "gpu.budget = <an integer of about 5001 digits>"),
    ("huge tokens", {"block_tokens": 10**5000}, "is more than 2147483648 tokens"),
    ("bytes path", {"disk_path": b"/tmp/kv"}, "disk.path = b'/tmp/kv' is not a path"),
    ("surrogate", {"disk_path": "/tmp/\ud800"}, "is not valid UTF-8 text"),
    ("home of nobody", {"disk_path": "~nosuchuser/kv"}, "no user 'nosuchuser' to expand ~nosu"),
    ("NUL", {"disk_path": "/tmp/a\0b"}, "contains a NUL byte; remove it (from override)"),
    ("object", {"host_budget": object()}, "host.budget = <object object at"),
    ("set", {"disk_codec": {"lz4"}}, "disk.codec = {'lz4'} is not a codec"),
    ("10TiB", {"host_budget": "10TiB"}, "more than the 20.00 GiB of available RAM"),
    ("remote bytes", {"remote_url": b"valkey://h"}, "remote.url = b'valkey://h' is not a URL"),
    ("remote db cluster", {"remote_url": "valkey://a:1,b:2/3"}, "selects db 3"),
    ("remote timeout", {"remote_url": "valkey://h", "remote_timeout_ms": 10**9}, "timeout_ms"),
    ("remote ttl str", {"remote_url": "valkey://h", "remote_ttl_s": "1d"}, "remote.ttl_s = '1d'"),
    ("remote hmac path", {"remote_url": "valkey://h", "remote_hmac_key_file": 7}, "not a path"),
]


@pytest.mark.parametrize(
    ("overrides", "fragment"), [c[1:] for c in BAD_OVERRIDES], ids=[c[0] for c in BAD_OVERRIDES]
)
def test_malformed_overrides_are_one_config_error_line(overrides, fragment):
    assert fragment in one_line_error(**overrides)


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        (123, "load_config(path) takes a TOML file path (str or os.PathLike), not int 123"),
        (b"cfg.toml", "not bytes b'cfg.toml'; pass the path as a str"),
        (["a.toml"], "not list ['a.toml']"),
        ("a\0b.toml", "config file path 'a\\x00b.toml' contains a NUL byte"),
        ("~nosuchuser/x.toml", "config file path '~nosuchuser/x.toml'"),
        ("/dev/zero", "is larger than 1 MiB"),
    ],
)
def test_malformed_path_arguments(path, fragment):
    assert fragment in one_line_error(path)


def test_remote_secrets_never_reach_a_message(tmp_path):
    """Scenario: a short HMAC key file and a password in the url: the message shows neither."""
    key = tmp_path / "hmac.key"
    key.write_text("short-secret\n")
    message = one_line_error(remote={"url": "valkey://u:s3cret@h", "hmac_key_file": str(key)})
    assert "holds 12 bytes; use at least 32" in message
    assert "s3cret" not in message and "short-secret" not in message


def test_remote_files_are_relative_to_the_config(tmp_path):
    (tmp_path / "pw").write_text("hunter2\n")
    (tmp_path / "cfg.toml").write_text('[remote]\nurl = "valkey://h:1"\npassword_file = "pw"\n')
    cfg = load_config(tmp_path / "cfg.toml")
    assert cfg.remote.password_file == str(tmp_path / "pw")
    assert cfg.remote.spec.password == "hunter2" and "hunter2" not in repr(cfg)


def test_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[disk]\npath = "caf\xe9"\n')
    assert "is not valid TOML: 'utf-8' codec can't decode byte 0xe9" in one_line_error(path)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("KVTIER_BLOCK_TOKENS", "1_6", "block_tokens = '1_6' is not a positive multiple of 16"),
        ("KVTIER_BLOCK_TOKENS", "２５６", "block_tokens = '２５６' is not"),
        ("KVTIER_BLOCK_TOKENS", "+16", "block_tokens = '+16' is not"),
        ("KVTIER_POLICY_SINK_TOKENS", "9" * 5000, "is more than 2147483648 tokens"),
        ("KVTIER_HOST_BUDGET", "٣GiB", "(write the digits as ASCII 0-9)"),
        ("KVTIER_DISK_PATH", "~nosuchuser", "there is no user 'nosuchuser'"),
        ("KVTIER_GPU_BUDGE", "1GiB", "did you mean 'KVTIER_GPU_BUDGET'? unset it or fix its"),
        ("KVTIER_WHATEVER", "1", "unknown environment variable KVTIER_WHATEVER; "),
    ],
)
def test_malformed_env_vars(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    message = one_line_error()
    assert fragment in message
    assert message.count("KVTIER_") <= 4  # no list of every variable (it was 520 characters)


# --- the store path, checked when the config loads (not at the first block written) -------------


def test_store_inside_a_file(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    message = one_line_error(disk_path=file / "kv")
    assert f"disk.path = '{file / 'kv'}' cannot hold the block store: {file} is a file" in message


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_store_on_proc():
    message = one_line_error(disk_path="/proc/kvtier", disk_budget="1GiB")
    assert "disk.path = '/proc/kvtier' cannot hold the block store: cannot create a directory" in (
        message
    )
    assert "or disk.budget = 0 for no disk tier (from override)" in message
    assert load_config(disk_path="/proc/kvtier", disk_budget=0).disk.budget_bytes == 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_store_in_an_unwritable_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    message = one_line_error(disk_path=locked / "kv")
    assert f"cannot create a directory in {locked} (Permission denied)" in message


def test_store_probe_failure_is_reported(monkeypatch, tmp_path):
    """Scenario: an unwritable store (as a non-root user sees one) is refused when loading."""

    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    store = tmp_path / "store"
    message = one_line_error(disk_path=store)
    assert f"'{store}' cannot hold the block store: cannot create a directory in {tmp_path}" in (
        message
    )
    assert "(Permission denied)" in message


def test_store_probe_leaves_nothing_behind(tmp_path):
    (tmp_path / "parent").mkdir()
    store = tmp_path / "parent" / "store"
    load_config(disk_path=store)
    assert list(store.parent.iterdir()) == []
    store.mkdir()
    load_config(disk_path=store)
    assert list(store.iterdir()) == []


# --- budgets and the machine ----------------------------------------------------------------------


def test_budgets_up_to_what_is_free_are_accepted():
    cfg = load_config(gpu_budget="10GiB", host_budget=HOST_FREE, disk_budget="100GiB")
    assert (cfg.gpu.budget_bytes, cfg.host.budget_bytes) == (GPU_FREE, HOST_FREE)
    assert cfg.disk.budget_bytes == DISK_FREE


def test_budget_above_free_names_the_machines_figure():
    message = one_line_error(host_budget=HOST_FREE + 1)
    assert message == (
        "host.budget = 21474836481 is 20.00 GiB, more than the 20.00 GiB of available RAM; lower "
        "it, or use a percentage of what is free such as '50%' (from override)"
    )


def test_format_size_never_overflows():
    assert format_size(int("9" * 400) * 2**40).endswith("E+400 TiB")
    assert format_size(10**5000).endswith(" TiB")  # no ValueError: no str() of the int
    assert format_size(8 * 2**60 - 1) == "8388608.00 TiB"


def test_resolve_ignores_the_env_vars_it_is_told_to():
    cfg = resolve(
        None, environ={"KVTIER_NOPE": "1", "KVTIER_BLOCK_TOKENS": "32"}, ignore_env={"KVTIER_NOPE"}
    )
    assert cfg.block_tokens == 32


# --- policy modules and settings ------------------------------------------------------------------

MINE = "import kvtier\n\n@kvtier.register_policy('mine')\nclass Mine(kvtier.Policy):\n"

# (id, {file name: text} written next to the TOML, TOML, fragment)
BAD_POLICY = [
    (
        "missing module",
        {},
        '[policy]\nmodule = "no_such_mod_xyz"',
        "policy.module = 'no_such_mod_xyz' cannot be imported: no module named 'no_such_mod_xyz'",
    ),
    ("not a name", {}, '[policy]\nmodule = "my-policy"', "'my-policy' is not a module name"),
    ("not a str", {}, "[policy]\nmodule = 3", "policy.module = 3 is not a module; use a dotted"),
    (
        "raises",
        {"boom.py": "raise RuntimeError('boom\\nsecond line')\n"},
        '[policy]\nmodule = "boom"',
        "policy.module = 'boom' failed to import: RuntimeError: boom second line; fix the module",
    ),
    (
        "syntax error",
        {"broken.py": "def (:\n"},
        '[policy]\nmodule = "broken.py"',
        "failed to import: SyntaxError: invalid syntax",
    ),
    (
        "missing dependency",
        {"needy.py": "import no_such_dep_xyz\n"},
        '[policy]\nmodule = "needy"',
        "failed to import: ModuleNotFoundError: No module named 'no_such_dep_xyz'",
    ),
    (
        "registers nothing",
        {"empty_mod.py": ""},
        '[policy]\nmodule = "empty_mod"\nname = "ghost"',
        "policy.name = 'ghost' is not a registered policy (after importing policy.module = 'emp",
    ),
    ("no such file", {}, '[policy]\nmodule = "nope.py"', "nope.py' is not a file; fix the path"),
    ("odd stem", {"my-pol.py": ""}, '[policy]\nmodule = "my-pol.py"', "'my-pol' is not a module"),
    (
        "shadows",
        {"json.py": ""},
        '[policy]\nmodule = "json.py"',
        "another module named 'json' exists",
    ),
    (
        "unknown setting",
        {"mine.py": MINE + "    settings = {'window': 4}\n"},
        '[policy]\nmodule = "mine"\nname = "mine"\n[policy.mine]\nwindw = 1',
        "unknown key 'policy.mine.windw'; did you mean 'window'? policy 'mine' takes: window",
    ),
    (
        "wrong type",
        {"mine.py": MINE + "    settings = {'window': 4}\n"},
        '[policy]\nmodule = "mine"\nname = "mine"\n[policy.mine]\nwindow = "x"',
        "policy.mine.window = 'x' is not an integer (default 4)",
    ),
    (
        "bool for int",
        {"mine.py": MINE + "    settings = {'window': 4}\n"},
        '[policy]\nmodule = "mine"\nname = "mine"\n[policy.mine]\nwindow = true',
        "policy.mine.window = True is not an integer",
    ),
    (
        "inf",
        {"mine.py": MINE + "    settings = {'scale': 1.0}\n"},
        '[policy]\nmodule = "mine"\n[policy.mine]\nscale = inf',
        "policy.mine.scale = inf is not a number (default 1.0)",
    ),
    (
        "huge int",
        {"mine.py": MINE + "    settings = {'scale': 1.0, 'window': 4}\n"},
        f'[policy]\nmodule = "mine"\n[policy.mine]\nscale = {"9" * 30}',
        "policy.mine.scale = 999999999999999999999999999999 is not a number",
    ),
    (
        "unregistered table",
        {},
        "[policy.nobody]\nx = 1",
        "unknown key 'policy.nobody'; a [policy.<name>] table holds the settings of a registered",
    ),
    (
        "sink_recent table",
        {},
        "[policy.sink_recent]\nsink_tokens = 1",
        "policy 'sink_recent' declares no settings (sink_tokens is a [policy] key: write it there)",
    ),
    (
        "bad declaration",
        {"mine.py": MINE + "    settings = [1]\n"},
        '[policy]\nmodule = "mine"\nname = "mine"',
        "policy 'mine' declares settings = [1]; declare a dict of setting name -> default",
    ),
]


@pytest.fixture
def policy_sandbox(monkeypatch, tmp_path):
    """tmp_path on sys.path, a private policy registry, and no user module left behind."""
    from kvtier import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.mark.parametrize(
    ("files", "toml", "fragment"), [c[1:] for c in BAD_POLICY], ids=[c[0] for c in BAD_POLICY]
)
def test_malformed_policy_modules_and_settings(policy_sandbox, files, toml, fragment):
    for name, text in files.items():
        (policy_sandbox / name).write_text(text)
    path = policy_sandbox / "policy.toml"
    path.write_text(toml + "\n")
    message = one_line_error(path)
    assert fragment in message
    assert message.endswith(f"(from file {path})")
    result = CliRunner().invoke(cli.main, ["config", "validate", str(path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


def test_a_failing_policy_module_keeps_its_traceback_for_python_callers(policy_sandbox):
    (policy_sandbox / "boom.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError) as info:
        load_config(policy_module="boom")
    assert isinstance(info.value.__cause__, RuntimeError)


# --- hypothesis: junk in, only ConfigError out ----------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvtier.config import ENV_VARS, OVERRIDE_NAMES, TABLES  # noqa: E402
from kvtier.config.render import toml_key, toml_value  # noqa: E402

JUNK_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # write nothing into the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# No "/" or "\\" in generated text: a path is then one component under the test's cwd (deep in
# tmp_path), so the store probe never touches the machine's real directories.
_CHARS = st.characters(blacklist_characters="/\\", blacklist_categories=("Cs",))
_DIGITS = "0123456789０１２３４５６７８９٠١٢٣٤٥٦٧٨٩_.-+ "
_SIZE_LIKE = st.builds(
    lambda number, unit: number + unit,
    st.text(alphabet=_DIGITS, min_size=1, max_size=12) | st.just("9" * 400),
    st.sampled_from(["", "GiB", "MB", "%", " TiB", "parsecs", "auto", "b", "kib", "%%"]),
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=10**4000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(_CHARS, max_size=30)
    | _SIZE_LIKE
    | st.sampled_from(["auto", "lz4", "raw", "sink_recent", "lru", "0", "100%", "-1", ""])
)
_TOML_SCALARS = _SCALARS.filter(
    lambda v: v is not None and not isinstance(v, float) or (isinstance(v, float) and v == v)
)
JUNK = st.recursive(
    _SCALARS | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(_CHARS, max_size=8) | st.integers(), inner, max_size=3)
    ),
    max_leaves=8,
)
_KEYS = st.sampled_from([*OVERRIDE_NAMES, *TABLES, "policy"]) | st.text(_CHARS, max_size=12)
_TABLE_KEYS = {table: st.sampled_from(keys) for table, keys in TABLES.items()}


def _table(name: str):
    keys = _TABLE_KEYS[name] | st.text(_CHARS, min_size=1, max_size=10)
    return st.dictionaries(keys, JUNK, max_size=4)


def _override(name: str, value: object) -> object:
    if name in ("policy_module", "policy") and isinstance(value, str):
        return "zz_no_such_module_" + value  # importing random real modules (antigravity) is not ok
    if isinstance(value, dict) and "module" in value:
        value = {**value, "module": "zz_no_such_module_" + str(value["module"])}
    return value


def _only_config_error(call) -> None:
    try:
        call()
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and len(message) <= MAX_MESSAGE, message


@pytest.fixture
def sandbox(monkeypatch, tmp_path):
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)  # relative junk paths land here (".." stays inside tmp_path)
    return deep


@JUNK_SETTINGS
@given(
    overrides=st.dictionaries(
        _KEYS,
        JUNK | st.sampled_from(list(TABLES)).flatmap(_table),
        max_size=5,
    )
)
def test_junk_overrides_give_only_config_errors(sandbox, overrides):
    cleaned = {name: _override(name, value) for name, value in overrides.items()}
    _only_config_error(lambda: load_config(**cleaned))


@JUNK_SETTINGS
@given(
    environ=st.dictionaries(
        st.sampled_from([*ENV_VARS, "KVTIER_", "KVTIER_X", "PATH"])
        | st.text(_CHARS, max_size=12).map(lambda t: "KVTIER_" + t),
        _SCALARS.map(str) | st.text(_CHARS, max_size=20),
        max_size=5,
    )
)
def test_junk_environment_gives_only_config_errors(sandbox, environ):
    environ = {k: v for k, v in environ.items() if k != "KVTIER_POLICY_MODULE"}
    _only_config_error(lambda: resolve(None, environ=environ))


def _inline(value: object) -> str:
    """A TOML inline value (the test's own tiny writer: lists and inline tables too)."""
    if isinstance(value, list):
        return "[" + ", ".join(_inline(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{toml_key(str(k))} = {_inline(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, repr(value))
    return toml_value(value)


_TOML_VALUES = st.recursive(
    _TOML_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(_CHARS, min_size=1, max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


@JUNK_SETTINGS
@given(
    document=st.dictionaries(
        st.sampled_from([*TABLES, "block_tokens", "prefill_chunk_tokens"])
        | st.text(_CHARS, min_size=1, max_size=8),
        _TOML_VALUES
        | st.dictionaries(
            st.sampled_from(["budget", "path", "codec", "persist", "name", "sink_tokens", "x"])
            | st.text(_CHARS, min_size=1, max_size=8),
            _TOML_VALUES,
            max_size=4,
        ),
        max_size=5,
    )
)
def test_junk_toml_documents_give_only_config_errors(sandbox, document):
    lines = []
    for key, value in document.items():
        if isinstance(value, dict) and isinstance(value.get("module"), str):
            value["module"] = "zz_no_such_module_" + value["module"]
        lines.append(f"{toml_key(key)} = {_inline(value)}")
    path = sandbox / "junk.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _only_config_error(lambda: load_config(path))


@JUNK_SETTINGS
@given(
    text=st.text(
        st.sampled_from(list("[]{}=\"'.,#\n =0123456789gpuhostdiskbudget%GiB_-+:tf")), max_size=80
    )
)
def test_junk_toml_text_gives_only_config_errors(sandbox, text):
    path = sandbox / "junk.toml"
    path.write_text(text, encoding="utf-8")
    _only_config_error(lambda: load_config(path))
