"""Policies: ordering, pinning, and the registry (a user policy usable from TOML)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvtier
from kvtier import registry
from kvtier.blocks import BlockMeta, Tier
from kvtier.config import PolicyConfig
from kvtier.controller import TierController
from kvtier.layout import KVGeometry
from kvtier.policy import LFUPolicy, Policy, SinkRecentPolicy, make_policy, registered_policies

BT = 16
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Policies a test registers vanish after it (the registry is the one global state)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def _cfg(name: str, **kw):
    return kvtier.load_config(None, policy_name=name, block_tokens=BT, **kw).policy


def _blocks() -> list[BlockMeta]:
    # index, last_access, access_count
    spec = [(0, 5, 1), (1, 2, 9), (2, 2, 3), (3, 7, 2)]
    return [BlockMeta(index=i, last_access=a, access_count=c) for i, a, c in spec]


def _indices(blocks: list[BlockMeta]) -> list[int]:
    return [b.index for b in blocks]


# -- ordering --------------------------------------------------------------------------------------
def test_lru_lfu_order():
    """Scenario: LRU evicts the least recent (ties by position); LFU the least used."""
    lru = make_policy(_cfg("lru"), BT)
    assert _indices(lru.victims(_blocks(), 4, 64)) == [1, 2, 0, 3]
    lfu = make_policy(_cfg("lfu"), BT)
    assert _indices(lfu.victims(_blocks(), 2, 64)) == [0, 3]
    assert _indices(lfu.victims(_blocks(), 4, 64)) == [0, 3, 2, 1]


def test_lfu_ties_fall_back_to_recency_then_position():
    blocks = [
        BlockMeta(index=0, last_access=4, access_count=2),
        BlockMeta(index=1, last_access=3, access_count=2),
        BlockMeta(index=2, last_access=3, access_count=2),
        BlockMeta(index=3, last_access=1, access_count=5),
    ]
    assert _indices(make_policy(_cfg("lfu"), BT).victims(blocks, 4, 64)) == [1, 2, 0, 3]


def test_victims_respect_count_and_skip_pinned_blocks():
    """Scenario: at most `count` victims; a block with pins > 0 is never one, in any policy."""
    for name in ("lru", "lfu", "sink_recent"):
        policy = make_policy(_cfg(name, policy_sink_tokens=0, policy_recent_tokens=0), BT)
        blocks = _blocks()
        blocks[1].pins = 1
        victims = policy.victims(blocks, 10, seq_tokens=64)
        assert 1 not in _indices(victims) and len(victims) == 3, name
        assert policy.victims(blocks, 0, seq_tokens=64) == []
        assert len(policy.victims(blocks, 2, seq_tokens=64)) == 2
        assert policy.victims([], 3, seq_tokens=64) == []


def test_victims_keep_the_order_of_equal_keys_stable():
    """Scenario: candidates in any order give the same victims (the key decides, not the list)."""
    lru = make_policy(_cfg("lru"), BT)
    forward = _indices(lru.victims(_blocks(), 4, 64))
    assert _indices(lru.victims(list(reversed(_blocks())), 4, 64)) == forward


# -- pinning ---------------------------------------------------------------------------------------
def test_sink_recent_pins_the_ends():
    """Scenario: the first sink_tokens and last recent_tokens never leave the GPU."""
    policy = make_policy(_cfg("sink_recent", policy_sink_tokens=16, policy_recent_tokens=16), BT)
    victims = policy.victims(_blocks(), 4, seq_tokens=64)
    assert _indices(victims) == [1, 2]  # block 0 is the sink, block 3 the recent


@pytest.mark.parametrize(
    ("sink", "recent", "seq_tokens", "pinned"),
    [
        (16, 16, 64, {0, 3}),
        (17, 16, 64, {0, 1, 3}),  # one sink token into block 1 pins it
        (0, 16, 64, {3}),
        (16, 0, 64, {0}),
        (0, 16, 60, {2, 3}),  # the recent window [44, 60) spans two blocks
        (0, 0, 60, {3}),  # the partly filled last block reaches past seq_tokens
        (0, 64, 64, {0, 1, 2, 3}),
        (32, 32, 64, {0, 1, 2, 3}),
    ],
)
def test_sink_recent_pinned_blocks(sink, recent, seq_tokens, pinned):
    policy = make_policy(
        _cfg("sink_recent", policy_sink_tokens=sink, policy_recent_tokens=recent), BT
    )
    blocks = [BlockMeta(index=i) for i in range(4)]
    assert {b.index for b in blocks if policy.pinned(b, seq_tokens)} == pinned
    victims = policy.victims(blocks, 4, seq_tokens)
    assert set(_indices(victims)) == {0, 1, 2, 3} - pinned


def test_lru_and_lfu_pin_only_by_pins():
    for name in ("lru", "lfu"):
        policy = make_policy(_cfg(name), BT)
        assert not policy.pinned(BlockMeta(index=0), 64)
        assert policy.pinned(BlockMeta(index=0, pins=2), 64)


def test_make_policy_builds_the_registered_classes():
    assert type(make_policy(_cfg("lru"), BT)) is Policy
    assert type(make_policy(_cfg("lfu"), BT)) is LFUPolicy
    policy = make_policy(_cfg("sink_recent"), 32)
    assert type(policy) is SinkRecentPolicy and policy.block_tokens == 32
    assert {"lru", "lfu", "sink_recent"} <= set(registered_policies())
    assert registered_policies() == sorted(registered_policies())


# -- registry --------------------------------------------------------------------------------------
def test_unknown_policy_lists_the_registered_ones():
    """Scenario: a typo in policy.name names the choices and how to register one."""
    with pytest.raises(kvtier.ConfigError, match="sink_recent") as info:
        kvtier.load_config(None, policy_name="lruu")
    assert "register_policy" in str(info.value)


def test_unknown_policy_lists_user_policies_too(tmp_path):
    """Scenario: the error lists every registered name, a user's own included, also from TOML."""

    @kvtier.register_policy("mine")
    class Mine(Policy):
        pass

    toml = tmp_path / "cfg.toml"
    toml.write_text('[policy]\nname = "theirs"\n')
    with pytest.raises(kvtier.ConfigError) as info:
        kvtier.load_config(toml)
    message = str(info.value)
    for name in ("lru", "lfu", "sink_recent", "mine"):
        assert name in message
    assert "theirs" in message
    with pytest.raises(kvtier.ConfigError, match="theirs"):
        make_policy(PolicyConfig("theirs", sink_tokens=0, recent_tokens=0, prefetch_depth=0), BT)


@pytest.mark.parametrize("name", ["", None])
def test_register_policy_needs_a_name(name):
    with pytest.raises(kvtier.ConfigError, match="non-empty"):
        kvtier.register_policy(name)


def test_register_policy_refuses_a_dotted_name():
    """Scenario: [policy.<name>] holds a policy's settings, so a dot would split its name."""
    with pytest.raises(kvtier.ConfigError, match="must not contain '.'; use '_' or '-'"):
        kvtier.register_policy("my.policy")


LAYERS = 3
TOKEN_BYTES = 2 * 1 * 2 * 8 * 4  # K and V, batch 1, 2 kv heads, head_dim 8, fp32
SLOT = BT * LAYERS * TOKEN_BYTES


def _run(toml: Path, blocks: int = 6, gpu_slots: int = 3, **overrides) -> TierController:
    """`blocks` one-block steps through a controller whose GPU holds `gpu_slots` slots besides
    staging."""
    cfg = kvtier.load_config(
        toml,
        block_tokens=BT,
        prefill_chunk_tokens=BT,
        # staging: prefetch_depth 0, one buffer
        gpu_budget=blocks * BT * TOKEN_BYTES + gpu_slots * SLOT,
        host_budget=16 * SLOT,
        disk_budget=0,
        **overrides,
    )
    cpu = (torch.device("cpu"),) * LAYERS
    shape = KVGeometry(tuple(range(LAYERS)), cpu, 1, 2, 8, torch.float32, cfg.block_tokens)
    ctl = TierController(cfg, shape, fingerprint="p")
    for _ in range(blocks):
        for layer in range(LAYERS):
            kv = torch.randn(1, 2, BT, 8)
            ctl.append(layer, kv, kv)
    ctl.check_invariants()
    return ctl


def _on_gpu(ctl: TierController) -> set[int]:
    return {b.index for b in ctl.table if Tier.GPU in b.slots}


def test_user_policy_from_toml(tmp_path):
    """Scenario: a registered policy is selected from a TOML file and drives demotion."""

    @kvtier.register_policy("newest_first")
    class NewestFirst(Policy):
        def sort_key(self, block):
            return (-block.index,)

    assert "newest_first" in registered_policies()
    toml = tmp_path / "cfg.toml"
    toml.write_text('[policy]\nname = "newest_first"\nprefetch_depth = 0\n')
    ctl = _run(toml)
    assert type(ctl.placement.policy) is NewestFirst
    assert {0, 1} <= _on_gpu(ctl)  # the newest sealed blocks were demoted first
    ctl.close()


def test_user_victims_override_decides_demotion(tmp_path):
    """Scenario: a policy overriding `victims` (newest first) keeps the oldest blocks on the GPU,
    where LRU keeps the newest; each demotion asks the policy."""
    asked: list[list[int]] = []

    @kvtier.register_policy("mine")
    class Mine(Policy):
        def victims(self, candidates, count, seq_tokens):
            asked.append(_indices(candidates))
            return sorted(candidates, key=lambda b: -b.index)[:count]

    toml = tmp_path / "mine.toml"
    toml.write_text('[policy]\nname = "mine"\nprefetch_depth = 0\n')
    mine = _run(toml)
    assert asked, "the controller never asked the policy for a victim"
    toml.write_text('[policy]\nname = "lru"\nprefetch_depth = 0\n')
    lru = _run(toml)
    assert 0 in _on_gpu(mine) and 0 not in _on_gpu(lru)
    assert max(_on_gpu(lru)) == 5 and max(_on_gpu(mine)) == 5  # the open step's block stays
    mine.close()
    lru.close()


def test_user_pinned_override_keeps_blocks_on_the_gpu(tmp_path):
    """Scenario: a policy pinning block 1 (by `pinned`) never gets it demoted by the controller."""

    @kvtier.register_policy("pin_one")
    class PinOne(Policy):
        def pinned(self, block, seq_tokens):
            return block.index == 1 or super().pinned(block, seq_tokens)

    toml = tmp_path / "pin.toml"
    toml.write_text('[policy]\nname = "pin_one"\nprefetch_depth = 0\n')
    ctl = _run(toml)
    assert 1 in _on_gpu(ctl) and 0 not in _on_gpu(ctl)
    ctl.close()


# -- policies users ship: [policy] module, [policy.<name>] settings ------------------------------
@pytest.fixture
def fresh_modules(monkeypatch, tmp_path):
    """User policy modules imported by a test are forgotten after it (so the next registers
    again into its own private registry)."""
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_custom_policy_example_end_to_end(fresh_modules):
    """Scenario: configs/custom-policy.toml imports configs/custom_policy.py, which registers
    middle_out; its settings table reaches the policy and its victims order drives demotion."""
    toml = REPO / "configs" / "custom-policy.toml"
    cfg = kvtier.load_config(toml)
    assert cfg.policy.name == "middle_out"
    assert cfg.policy.module == str(REPO / "configs" / "custom_policy.py")
    assert dict(cfg.policy.settings) == {"edge_blocks": 2}
    policy = make_policy(cfg.policy, BT)
    assert type(policy).__name__ == "MiddleOut" and isinstance(policy, Policy)
    assert dict(policy.settings) == {"edge_blocks": 2} and policy.max_pinned_blocks() == 4
    blocks = [BlockMeta(index=i) for i in range(8)]
    # ends 0, 1 and 6, 7 pinned; the rest farthest from both ends first
    assert _indices(policy.victims(blocks, 8, seq_tokens=8 * BT)) == [3, 4, 2, 5]

    streaming = {"blocks": 8, "gpu_slots": 4, "policy_prefetch_depth": 0}  # 8 blocks do not fit
    ctl = _run(toml, **streaming, policy={"middle_out": {"edge_blocks": 1}})
    assert type(ctl.placement.policy).__name__ == "MiddleOut"
    assert ctl.placement.policy.settings["edge_blocks"] == 1
    on_gpu = _on_gpu(ctl)
    assert {0, 7} <= on_gpu and not {3, 4} & on_gpu  # the ends stayed, the middle went first
    ctl.close()
    lru = _run(toml, **streaming, policy_name="lru")
    assert 0 not in _on_gpu(lru)  # LRU demotes the oldest: the order came from middle_out
    lru.close()


def test_policy_module_by_dotted_name(fresh_modules):
    """Scenario: `module = "my_pkg.my_policy"` imports the user's package before the name."""
    package = fresh_modules / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "my_policy.py").write_text(
        "import kvtier\n\n"
        "@kvtier.register_policy('newest_first')\n"
        "class NewestFirst(kvtier.Policy):\n"
        "    settings = {'scale': 1.0, 'label': 'x', 'strict': False}\n"
        "    def sort_key(self, block):\n"
        "        return (-block.index,)\n"
    )
    toml = fresh_modules / "cfg.toml"
    toml.write_text(
        '[policy]\nname = "newest_first"\nmodule = "my_pkg.my_policy"\nprefetch_depth = 0\n'
        "[policy.newest_first]\nscale = 2\n"
    )
    cfg = kvtier.load_config(toml)
    assert cfg.policy.module == "my_pkg.my_policy"
    assert dict(cfg.policy.settings) == {"scale": 2.0, "label": "x", "strict": False}
    assert type(cfg.policy.settings["scale"]) is float  # an int where the default is a float
    ctl = _run(toml)
    assert {0, 1} <= _on_gpu(ctl)
    ctl.close()
    again = cfg.with_overrides(policy={"newest_first": {"label": "y"}})
    assert dict(again.policy.settings) == {"scale": 2.0, "label": "y", "strict": False}


def test_config_validate_imports_the_policy_module_in_a_fresh_process(tmp_path):
    """Scenario: `kvtier config validate` (any new process) imports the module itself; nothing
    registered the policy beforehand."""
    (tmp_path / "their_policy.py").write_text(
        "import kvtier\n\n@kvtier.register_policy('theirs')\nclass Theirs(kvtier.Policy):\n"
        "    settings = {'window': 8}\n"
    )
    toml = tmp_path / "cfg.toml"
    toml.write_text(
        '[policy]\nname = "theirs"\nmodule = "their_policy"\n[policy.theirs]\nwindow = 3\n'
    )
    env = {"PYTHONPATH": str(tmp_path), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "kvtier", "config", "validate", str(toml)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert (run.returncode, run.stdout) == (0, f"ok: {toml}\n"), run.stderr
    toml.write_text(toml.read_text().replace("window = 3", "windw = 3"))
    run = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "unknown key 'policy.theirs.windw'; did you mean 'window'? policy 'theirs' takes" in (
        run.stderr
    )


def test_settings_of_a_policy_not_chosen_are_checked_not_applied(fresh_modules):
    """Scenario: one file keeps several policies' settings; policy.name picks whose apply."""

    @kvtier.register_policy("mine")
    class Mine(Policy):
        settings = {"window": 4}

    cfg = kvtier.load_config(policy={"name": "lru", "mine": {"window": 9}})
    assert cfg.policy.name == "lru" and dict(cfg.policy.settings) == {}
    assert cfg.specs["policy.mine.window"] == 9
    assert dict(cfg.with_overrides(policy_name="mine").policy.settings) == {"window": 9}
    with pytest.raises(kvtier.ConfigError, match="policy.mine.window = 'x' is not an integer"):
        kvtier.load_config(policy={"name": "lru", "mine": {"window": "x"}})


def test_policy_refuses_settings_it_does_not_declare():
    """Scenario: a hand-built PolicyConfig with an unknown setting fails at make_policy."""
    cfg = PolicyConfig("lru", 0, 0, 0, settings={"window": 1})
    with pytest.raises(kvtier.ConfigError, match=r"policy 'lru' has no settings \['window'\]"):
        make_policy(cfg, BT)
