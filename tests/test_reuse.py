"""Prefix reuse in one process: a second sequence loads the stored blocks of its prompt's prefix
(from another live cache's GPU or host copies, or the disk store) and computes only the rest,
token- and logit-exact against DynamicCache; stored blocks that went bad are a miss.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    BLOCK_TOKENS,
    assert_same_generation,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
)

import kvtier
from kvtier.blocks import Tier
from kvtier.controller import calibration, reuse
from kvtier.controller.costs import PAGE_CACHE
from kvtier.controller.index import INDEX
from kvtier.errors import StoreCorruptError
from kvtier.tiers.disk.areas import StoreLayout
from kvtier.tiers.disk.tier import DiskTier
from kvtier.transfer import Mover

PROMPT = 100  # 6 full blocks of 16 and 4 tokens


@pytest.fixture(autouse=True)
def _fresh_index():
    """Each test starts with no measured prefill speed and no hits (the index is per process)."""
    INDEX.clear()
    yield
    INDEX.clear()


def _shared_files(store: Path) -> list[Path]:
    return sorted(StoreLayout(store).root.glob("v1/??/*.safetensors"))


def _roomy(config: Any, store: Path, **overrides: Any) -> kvtier.Config:
    """Budgets that keep a short sequence on the GPU tier alone."""
    return tiered_config(config, store, PROMPT + 40, gpu_blocks=16, host_blocks=16, **overrides)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_persisted_prefix_is_loaded_from_disk(kind: str, tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: with disk.persist a first generate writes every sealed block through; a second
    one (fresh cache, same prompt) loads 6 blocks from disk, computes 4 tokens, same output."""
    model, config = tiny_model(kind)
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    expected = reference_generate(model, ids)
    first, first_stats = tiered_generate(model, cfg, ids)
    assert_same_generation(expected, first)
    assert first_stats["prefix_hit_tokens"] == 0
    assert len(_shared_files(tmp_path / "store")) >= PROMPT // BLOCK_TOKENS
    second, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(expected, second)
    assert stats["prefix_hit_tokens"] == 6 * BLOCK_TOKENS
    assert stats["reuse"]["decision"] == "load"
    assert stats["reuse"]["loaded_blocks"]["disk"] == 6
    assert stats["reuse"]["predicted_load_s"] > 0 and stats["reuse"]["predicted_recompute_s"] > 0


def test_without_persist_nothing_outlives_the_cache(tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: persist off: a closed cache leaves nothing to reuse; the second run computes."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40)
    tiered_generate(model, cfg, ids)
    again, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), again)
    assert stats["prefix_hit_tokens"] == 0 and stats["reuse"]["decision"] == "none"


@pytest.mark.parametrize("where", ["gpu", "host", "disk"])
def test_prefix_from_another_live_cache(where: str, tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: a cache still open holds the prefix on its GPU tier (or host, or its private
    disk files); a second cache of the same model copies it from there and computes the rest;
    a different suffix after the shared prefix still matches DynamicCache."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    other = torch.cat([ids[:, :80], random_prompt(30, seed=5)], dim=1)  # 5 blocks shared
    if where == "gpu":
        cfg = _roomy(config, tmp_path / "store")
    elif where == "host":
        cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, host_blocks=16)
    else:  # no persist: the blocks that went to disk are the holder's own files
        cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, host_blocks=1)
    holder = kvtier.TieredCache(model, cfg)
    try:
        reference_generate(model, ids, cache=holder)
        held = holder.controller.table
        assert any(b.fastest_tier().name.lower() == where for b in list(held)[:5])
        got, stats = tiered_generate(model, cfg, other)
    finally:
        holder.close()
    assert_same_generation(reference_generate(model, other), got)
    assert stats["prefix_hit_tokens"] == 5 * BLOCK_TOKENS
    assert stats["reuse"]["loaded_blocks"][where] > 0


@pytest.mark.parametrize("holder_persists", [True, False])
def test_a_prefix_copied_from_a_persisting_cache_is_not_saved_again(
    holder_persists: bool, tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: both caches persist to one store; the second copies 5 blocks from the first,
    which saved them when it sealed them, so the second saves only the blocks it seals itself
    (and makes no host copies for saves on a GPU). A holder that does not persist: the second
    saves the copied blocks too."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    other = torch.cat([ids[:, :80], random_prompt(30, seed=5)], dim=1)  # 5 blocks shared
    cfg = _roomy(config, tmp_path / "store", disk_persist=True)
    holder = kvtier.TieredCache(model, cfg.with_overrides(disk_persist=holder_persists))
    cache = kvtier.TieredCache(model, cfg)
    try:
        reference_generate(model, ids, cache=holder)
        queued: list[int] = []
        original = type(holder.controller.placement.persist).add

        def add(persister: Any, blocks: list, **kwargs: Any) -> int:
            count = original(persister, blocks, **kwargs)
            if persister is cache.controller.placement.persist:
                queued.append(count)
            return count

        monkeypatch.setattr(type(holder.controller.placement.persist), "add", add)
        got = reference_generate(model, other, cache=cache)
        assert cache.stats()["prefix_hit_tokens"] == 5 * BLOCK_TOKENS
    finally:
        holder.close()
        cache.close()
    assert_same_generation(reference_generate(model, other), got)
    copied, own = queued[:5], queued[5:]  # one add per loaded block, then per sealed block
    assert copied == ([0] * 5 if holder_persists else [1] * 5)
    assert own == [1, 1]  # 126 tokens: blocks 5 and 6 sealed here


def test_same_cache_after_reset_reuses_what_another_cache_holds(tiny_model, tmp_path) -> None:
    """Scenario: reset() frees a cache's blocks, so it reuses from caches still open (here
    another one) or disk: after reset the same cache loads the prefix again, exact."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = _roomy(config, tmp_path / "store")
    holder, cache = kvtier.TieredCache(model, cfg), kvtier.TieredCache(model, cfg)
    try:
        reference_generate(model, ids, cache=holder)
        reference_generate(model, ids, cache=cache)
        cache.reset()
        again = reference_generate(model, ids, cache=cache)
        assert cache.stats()["prefix_hit_tokens"] == 6 * BLOCK_TOKENS
    finally:
        holder.close()
        cache.close()
    assert_same_generation(reference_generate(model, ids), again)


def test_recompute_when_measured_prefill_is_faster(tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: this process measured a prefill far faster than loading: the cost model picks
    recompute, stats say why, nothing is loaded, output exact."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    tiered_generate(model, cfg, ids)
    INDEX.clear()
    fingerprint = kvtier.TieredCache(model, cfg)
    fingerprint.close()
    INDEX.record_prefill(fingerprint.spec.fingerprint, 1e21, 1.0)  # a zettaFLOP per second
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    assert stats["prefix_hit_tokens"] == 0
    reuse = stats["reuse"]
    assert reuse["decision"] == "recompute" and "recomputing is faster" in reuse["reason"]
    assert reuse["predicted_recompute_s"] < reuse["predicted_load_s"]


def test_a_new_process_starts_from_the_prefill_speed_measured_here_before(
    tiny_model: Any, tmp_path: Path, monkeypatch
) -> None:
    """Scenario: a process timed the model's prefill; the next (its index empty, as a new
    process's is) weighs that speed, saved on this machine, instead of an assumed one."""
    monkeypatch.setattr(calibration, "CALIBRATION_BYTES", 0)  # the tiny model's loads teach
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    tiered_generate(model, cfg, ids)
    fingerprint = kvtier.TieredCache(model, cfg)
    fingerprint.close()
    fastest = INDEX.prefill_flops(fingerprint.spec.fingerprint)
    assert fastest is not None
    INDEX.clear()  # a new process: nothing timed yet
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    assert "measured here on " in stats["reuse"]["reason"], stats["reuse"]
    INDEX.clear()  # and the next one also learns how long the last load took against its guess
    _, stats = tiered_generate(model, cfg, ids)
    assert "loads here took x" in stats["reuse"]["reason"], stats["reuse"]


@pytest.mark.parametrize(("kind", "head_dim"), [("llama", 16), ("qwen3", 32)])
def test_prefill_speed_is_recorded_in_flops_at_its_positions(
    kind: str, head_dim: int, tiny_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: a prefill call of 100 positions after 1,000 cached ones, batch 2, took 2 s:
    the index records FLOP/s counting attention over the cached positions (4 x layers x query
    heads x head_dim a pair; qwen3's head_dim is not hidden / heads), the same count the cost
    model predicts recomputes with."""
    from types import SimpleNamespace

    from kvtier.hf import reuse as hf_reuse

    model, config = tiny_model(kind)
    state = hf_reuse.ReuseState(model)
    assert state.flops.per_pair == 4 * config.num_hidden_layers * 4 * head_dim
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(hf_reuse, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    state.start(1000, 100, torch.device("cpu"))
    state.finish("fp", torch.device("cpu"), batch=2)
    pairs = sum(p + 1 for p in range(1000, 1100))
    expected = 2 * (state.flops.per_token * 100 + state.flops.per_pair * pairs) / 2.0
    assert INDEX.prefill_flops("fp") == pytest.approx(expected)
    assert expected > 3 * 2 * state.flops.per_token * 100 / 2.0  # attention: most of it


def test_all_logits_requested_means_no_reuse(tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: a plain forward asks for every position's logits (logits_to_keep = 0): nothing
    is skipped, and the logits equal DynamicCache's."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    tiered_generate(model, cfg, ids)
    with kvtier.TieredCache(model, cfg) as cache, torch.no_grad():
        logits = model(ids, past_key_values=cache).logits
        assert cache.stats()["prefix_hit_tokens"] == 0
    with torch.no_grad():
        expected = model(ids, past_key_values=kvtier_free_cache(config)).logits
    assert logits.shape == expected.shape and (logits - expected).abs().max() <= 1e-5


def kvtier_free_cache(config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=config)


def _persisted_prompt(tiny_model, store: Path):
    """A prompt computed once with persist on: (model, ids, cfg, the ids of its first 6 blocks)."""
    from kvtier.controller.reuse import prompt_chain

    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, store, PROMPT + 40, disk_persist=True)
    tiered_generate(model, cfg, ids)
    probe = kvtier.TieredCache(model, cfg)
    probe.close()
    chain = prompt_chain(
        ids.tolist(), block_tokens=BLOCK_TOKENS, blocks=6, fingerprint=probe.spec.fingerprint
    )
    return model, ids, cfg, chain


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_stored_block_is_a_miss(damage: str, tiny_model, tmp_path, caplog) -> None:
    """Scenario: between two runs the file of block 3 of a persisted prefix is bit-flipped,
    truncated or deleted: the second run loads blocks 0-2, computes the rest, exact; a corrupt
    file is quarantined."""
    store = tmp_path / "store"
    model, ids, cfg, chain = _persisted_prompt(tiny_model, store)
    target = StoreLayout(store).shared(chain[3])
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[-100] ^= 0x10
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    else:
        target.unlink()
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    assert stats["prefix_hit_tokens"] == 3 * BLOCK_TOKENS
    if damage != "delete":
        assert any((store / "quarantine").iterdir())


def test_lookup_reads_no_file_and_a_bad_header_stops_the_load(
    tiny_model, tmp_path, monkeypatch
) -> None:
    """Scenario: a persisted prefix whose block 3 has a flipped header byte. The lookup counts
    every file (one stat each, no header read: a new process that then recomputes must not pay
    for reading them); the load verifies, quarantines block 3, reuses 0-2, computes the rest."""
    from kvtier.tiers.disk.reads import BlockReader

    store = tmp_path / "store"
    model, ids, cfg, chain = _persisted_prompt(tiny_model, store)
    target = StoreLayout(store).shared(chain[3])
    data = bytearray(target.read_bytes())
    data[12] ^= 0x01  # inside the safetensors JSON header
    target.write_bytes(bytes(data))
    parsed: list[str] = []
    parse = BlockReader._parse
    find_prefix = reuse.find_prefix

    def counted(self, file, block_id):
        parsed.append(block_id)
        return parse(self, file, block_id)

    def lookup(*args):
        found = find_prefix(*args)
        assert not parsed, "the lookup read a block file"
        return found

    monkeypatch.setattr(BlockReader, "_parse", counted)
    monkeypatch.setattr(reuse, "find_prefix", lookup)
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    assert stats["reuse"]["stored_tokens"] >= 6 * BLOCK_TOKENS
    assert stats["prefix_hit_tokens"] == 3 * BLOCK_TOKENS
    assert f"stopped: disk block {chain[3]} failed verification" in stats["reuse"]["reason"]
    assert any((store / "quarantine").iterdir())  # the bad file; the recomputed block is
    assert target.read_bytes() != bytes(data)  # persisted again under its name, whole


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.0.mlp.down_proj.weight", (5, 9)),
        ("model.layers.0.self_attn.q_proj.weight", (3, 2)),
        ("lm_head.weight", (7, 4)),
    ],
    ids=["mlp", "q_proj", "lm_head"],
)
def test_models_differing_in_one_weight_never_share_a_store(name, index, tiny_model, tmp_path):
    """Scenario: one persistent store, a model and a copy differing in one element of one MLP
    matrix, one q_proj, or only the LM head: the copy reuses nothing of what the first stored,
    and its tokens are its own (DynamicCache on the copy)."""
    import copy

    shared, config = tiny_model("llama")
    variant = copy.deepcopy(shared)
    with torch.no_grad():
        variant.get_parameter(name)[index] += 0.5
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    tiered_generate(shared, cfg, ids)
    got, stats = tiered_generate(variant, cfg, ids)
    assert stats["prefix_hit_tokens"] == 0, stats["reuse"]
    assert_same_generation(reference_generate(variant, ids), got)
    _, again = tiered_generate(shared, cfg, ids)
    assert again["prefix_hit_tokens"] > 0  # the store itself was reusable


def test_weights_edited_through_data_never_reuse_the_old_blocks(tiny_model, tmp_path) -> None:
    """Scenario: a persisted prompt, then the model's weights changed through `.data` (as a LoRA
    merge does; no version counter moves): the next generate reuses nothing, tokens exact."""
    import copy

    shared, config = tiny_model("llama")
    model = copy.deepcopy(shared)  # the session's model stays as it was
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    _, first = tiered_generate(model, cfg, ids)
    assert first["prefix_hit_tokens"] == 0
    model.get_parameter("model.layers.0.self_attn.v_proj.weight").data.mul_(1.5)
    got, stats = tiered_generate(model, cfg, ids)
    assert stats["prefix_hit_tokens"] == 0, stats["reuse"]
    assert_same_generation(reference_generate(model, ids), got)


def test_admit_after_hits_shares_a_block_once_reused(tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: persist with admit_after_hits = 1: a prompt seen once writes nothing shared;
    once a second cache reuses it (from the first, still open), its blocks are shared, and a
    third cache after both closed loads them from disk."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    store = tmp_path / "store"
    cfg = _roomy(config, store, disk_persist=True, disk_admit_after_hits=1)
    holder = kvtier.TieredCache(model, cfg)
    try:
        reference_generate(model, ids, cache=holder)
        assert _shared_files(store) == []
        _, stats = tiered_generate(model, cfg, ids)
        assert stats["prefix_hit_tokens"] == 6 * BLOCK_TOKENS
    finally:
        holder.close()
    assert len(_shared_files(store)) == 6
    got, stats = tiered_generate(model, cfg, ids)
    assert stats["reuse"]["loaded_blocks"]["disk"] == 6
    assert_same_generation(reference_generate(model, ids), got)


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_only_copy_lost_mid_decode(damage: str, tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: a block whose only copy is on disk goes bad while a sequence decodes: the step
    raises StoreCorruptError naming why (missing vs failed verification), the block is marked
    lost, further steps are refused, and after crop() to before it decoding goes on exactly."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, host_blocks=2)
    expected = reference_generate(model, ids, max_new_tokens=1)
    with kvtier.TieredCache(model, cfg) as cache, torch.no_grad():
        model(ids, past_key_values=cache, logits_to_keep=1)
        controller = cache.controller
        on_disk = [b for b in controller.table if b.slots and set(b.slots) == {Tier.DISK}]
        assert on_disk, controller.stats()["disk"]
        victim = on_disk[0]
        path = controller.stores[Tier.DISK].store.area / f"{victim.block_id}.safetensors"
        if damage == "flip":
            data = bytearray(path.read_bytes())
            data[-50] ^= 0x01
            path.write_bytes(bytes(data))
        else:
            path.unlink()
        step = ids[:, -1:]
        with pytest.raises(StoreCorruptError) as caught:
            model(step, past_key_values=cache)
        assert ("failed verification" if damage == "flip" else "missing") in str(caught.value)
        assert cache.stats()["lost_blocks"] == 1
        controller.check_invariants()  # consistent at once, before any crop
        with pytest.raises(StoreCorruptError, match="crop the cache"):
            model(step, past_key_values=cache)
        start = victim.index * BLOCK_TOKENS
        cache.crop(start - cache.get_seq_length())
        controller.check_invariants()
        logits = model(ids[:, start:], past_key_values=cache, logits_to_keep=1).logits
    assert (logits[:, -1] - expected.logits[0]).abs().max() <= 1e-5


def test_a_one_token_generate_measures_its_prefill(tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: generate(max_new_tokens=1) makes a single model call; its prefill is timed to
    its return (no next call of that cache ever comes), so the next prompt's load-or-recompute
    choice weighs the speed measured here."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    with kvtier.TieredCache(model, cfg) as cache:
        model.generate(ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
        fingerprint = cache.spec.fingerprint
    assert INDEX.prefill_flops(fingerprint) is not None
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    assert "measured in this process" in stats["reuse"]["reason"], stats["reuse"]


LONG = 200  # 12 full blocks of 16 and 8 tokens


def _persisted_long_prefix(tiny_model: Any, store: Path, **overrides: Any):
    """A first run persists a LONG-token prompt; returns the model, the prompt, a config for
    the second run (`overrides` on top) and the oracle's output."""
    model, config = tiny_model("llama")
    ids = random_prompt(LONG)
    tiered_generate(model, tiered_config(config, store, LONG + 40, disk_persist=True), ids)
    cfg = tiered_config(config, store, LONG + 40, disk_persist=True, **overrides)
    return model, ids, cfg, reference_generate(model, ids)


def _count_reads(monkeypatch: pytest.MonkeyPatch, *, hold_s: float = 0.0) -> dict[str, Any]:
    """Count Mover.submit_reads calls (blocks per call), DiskTier.load_block calls, the most of
    them running at once (each held `hold_s` longer), and per-layer DiskTier.load_into calls
    while the prefix loads (the prefill streams disk blocks by layer afterwards)."""
    seen: dict[str, Any] = {"submits": [], "blocks": 0, "layer_loads": 0, "most": 0, "now": 0}
    lock = threading.Lock()
    submit, load_block, load_into = Mover.submit_reads, DiskTier.load_block, DiskTier.load_into
    load_prefix = reuse.load_prefix
    loading = threading.Event()

    def counted_prefix(*args, **kwargs):
        loading.set()
        try:
            return load_prefix(*args, **kwargs)
        finally:
            loading.clear()

    def counted_submit(self, reads):
        seen["submits"].append(len(reads))
        return submit(self, reads)

    def counted_block(self, key, layers):
        with lock:
            seen["blocks"] += 1
            seen["now"] += 1
            seen["most"] = max(seen["most"], seen["now"])
        try:
            time.sleep(hold_s)
            return load_block(self, key, layers)
        finally:
            with lock:
                seen["now"] -= 1

    def counted_layer(self, key, tiered_index, out):
        seen["layer_loads"] += loading.is_set()
        return load_into(self, key, tiered_index, out)

    monkeypatch.setattr(reuse, "load_prefix", counted_prefix)
    monkeypatch.setattr(Mover, "submit_reads", counted_submit)
    monkeypatch.setattr(DiskTier, "load_block", counted_block)
    monkeypatch.setattr(DiskTier, "load_into", counted_layer)
    return seen


def test_disk_prefix_loads_as_one_batch(tiny_model, tmp_path: Path, monkeypatch) -> None:
    """Scenario: a 12-block persisted prefix is read as one batch, several block files in
    flight at once on the mover's I/O threads (not one ticket and one file open per layer and
    block); tokens and logits exact, the stats count the 12 disk blocks."""
    model, ids, cfg, expected = _persisted_long_prefix(tiny_model, tmp_path / "store")
    seen = _count_reads(monkeypatch, hold_s=0.02)
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(expected, got)
    assert seen["submits"][0] == 12 and seen["blocks"] == 12 and seen["most"] > 1
    assert seen["layer_loads"] == 0
    assert stats["prefix_hit_tokens"] == 12 * BLOCK_TOKENS
    assert stats["reuse"]["loaded_blocks"]["disk"] == 12
    assert stats["disk"]["bytes_read"] >= 12 * stats["block_bytes"]


def test_disk_prefix_larger_than_memory_loads_in_rounds(tiny_model, tmp_path, monkeypatch) -> None:
    """Scenario: GPU and host hold 3 of the 12 stored blocks: the blocks they have room for are
    read together, moved down (as a prefill does) to make room for the next round, and the
    whole prefix is reused, exact, as block by block did."""
    model, ids, cfg, expected = _persisted_long_prefix(
        tiny_model, tmp_path / "store", host_blocks=2
    )
    seen = _count_reads(monkeypatch)
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(expected, got)
    assert len(seen["submits"]) > 1 and max(seen["submits"]) > 1
    assert sum(seen["submits"]) == seen["blocks"] == 12
    assert stats["prefix_hit_tokens"] == 12 * BLOCK_TOKENS
    assert stats["reuse"]["loaded_blocks"]["disk"] == 12
    assert stats["disk"]["blocks"] > 0


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_bad_block_in_a_later_round_stops_reuse_there(
    damage, tiny_model, tmp_path, monkeypatch
) -> None:
    """Scenario: under memory pressure (several rounds) the file of block 9 is flipped before
    the run, or deleted once the lookup found it: blocks 0-8 are reused, the rest computed,
    exact; the flipped file is quarantined; stats()["reuse"] says which block stopped it, why."""
    store = tmp_path / "store"
    model, ids, cfg, expected = _persisted_long_prefix(tiny_model, store, host_blocks=2)
    probe = kvtier.TieredCache(model, cfg)
    probe.close()
    from kvtier.controller.reuse import prompt_chain

    chain = prompt_chain(
        ids.tolist(), block_tokens=BLOCK_TOKENS, blocks=12, fingerprint=probe.spec.fingerprint
    )
    target = StoreLayout(store).shared(chain[9])
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-100] ^= 0x10
        target.write_bytes(bytes(data))
    else:  # after the lookup: a file that vanishes while the prefix loads
        find_prefix = reuse.find_prefix

        def then_delete(*args):
            found = find_prefix(*args)
            target.unlink()
            return found

        monkeypatch.setattr(reuse, "find_prefix", then_delete)
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(expected, got)
    assert stats["reuse"]["stored_tokens"] == 12 * BLOCK_TOKENS
    assert stats["prefix_hit_tokens"] == 9 * BLOCK_TOKENS
    assert stats["reuse"]["loaded_blocks"]["disk"] == 9
    why = "failed verification" if damage == "flip" else "is missing"
    assert f"stopped: disk block {chain[9]} {why}" in stats["reuse"]["reason"]
    quarantined = (store / "quarantine").is_dir() and any((store / "quarantine").iterdir())
    assert quarantined == (damage == "flip")


def test_a_disk_load_calibrates_the_next_prediction(
    tiny_model: Any, tmp_path: Path, monkeypatch
) -> None:
    """Scenario: a prefix loaded from disk records how long it took against the prediction;
    the next choice from disk scales its prediction by that and says so; output exact."""
    monkeypatch.setattr(calibration, "CALIBRATION_BYTES", 0)  # the tiny model's loads teach
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    tiered_generate(model, cfg, ids)
    _, first = tiered_generate(model, cfg, ids)
    assert first["reuse"]["loaded_blocks"]["disk"] > 0
    # the disk's or, when the page cache holds the files just written, the page cache's
    (source,) = INDEX.load_scale()
    assert source in (Tier.DISK, PAGE_CACHE)
    scale = INDEX.load_scale()[source]
    measured = first["reuse"]["load_s"] / first["reuse"]["predicted_load_s"]
    assert scale == pytest.approx(measured, rel=1e-3)  # the stats round to microseconds
    got, second = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    assert "loads here took" in second["reuse"]["reason"], second["reuse"]


@pytest.mark.parametrize("cached", [True, False], ids=["page-cache", "cold"])
def test_the_choice_weighs_a_cached_file_at_the_page_caches_speed(
    cached: bool, tiny_model: Any, tmp_path: Path, monkeypatch
) -> None:
    """Scenario: a persisted prefix read back from files the page cache holds, or (as the
    probe says) does not: the reason names the page cache's speed or the disk's, the cold
    prediction is the slower one, and the tokens are exact either way."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    tiered_generate(model, cfg, ids)
    probe = DiskTier.page_cached  # None (no file) stays None

    def page_cached(self, key: str) -> bool | None:
        return None if probe(self, key) is None else cached

    monkeypatch.setattr(DiskTier, "page_cached", page_cached)
    got, stats = tiered_generate(model, cfg, ids)
    assert_same_generation(reference_generate(model, ids), got)
    reason = stats["reuse"]["reason"]
    assert ("page_cache 3 GB/s (assumed)" in reason) == cached, reason
    assert ("disk 1.9 GB/s (assumed)" in reason) != cached, reason
    assert stats["reuse"]["loaded_blocks"]["disk"] > 0 and "stopped" not in reason


def test_a_small_load_teaches_the_cost_model_nothing(tiny_model: Any, tmp_path: Path) -> None:
    """Scenario: the tiny model's whole prefix (KiBs, under CALIBRATION_BYTES) loads from disk:
    its time, mostly what a process pays once, scales no later prediction, in this process or
    (learned.json) the next."""
    model, config = tiny_model("llama")
    ids = random_prompt(PROMPT)
    cfg = tiered_config(config, tmp_path / "store", PROMPT + 40, disk_persist=True)
    tiered_generate(model, cfg, ids)
    _, first = tiered_generate(model, cfg, ids)
    assert first["reuse"]["loaded_blocks"]["disk"] > 0 and not INDEX.load_scale()
    INDEX.clear()
    _, second = tiered_generate(model, cfg, ids)
    assert "loads here took" not in second["reuse"]["reason"], second["reuse"]


def test_the_fastest_prefill_call_sets_the_speed() -> None:
    """Scenario: a process's first prefill is slow (kernel set-up, pinning), later ones fast:
    the speed the cost model weighs is the fastest call's, not a total dragged down by the
    first."""
    INDEX.record_prefill("fp", 1e12, 10.0)  # 0.1 TFLOP/s: the first call
    INDEX.record_prefill("fp", 4e12, 0.01)  # 400 TFLOP/s
    INDEX.record_prefill("fp", 1e12, 0.01)  # 100 TFLOP/s
    assert INDEX.prefill_flops("fp") == pytest.approx(4e14)
    assert INDEX.prefill_flops("other") is None
