"""HashThreads and the rule for when a block's layers use them: the digests, their order and the
stored bytes are those of one thread; only big blocks go to the threads (signed ones from 1 MiB
when saved, from 8 MiB when loaded).
No server: the tier's own use of the threads is in tests/test_remote_tier.py."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
import torch
import xxhash

from kvtier import machine
from kvtier.tiers.codec import Checksum, byte_view
from kvtier.tiers.remote.hash_threads import THREAD_PREFIX, HashThreads, worth_threads
from kvtier.tiers.remote.tier import RemoteTier
from kvtier.tiers.remote.values import encode_value

HMAC_KEY = b"0123456789abcdef0123456789abcdef"
# bytes per tensor: empty, tiny, odd, and big enough that the threads overlap
SIZES = [0, 1, 7, 1024, (64 << 10) + 3, 1 << 20, (5 << 20) + 1]
REFERENCE = {
    Checksum.XXH3_128: xxhash.xxh3_128_hexdigest,
    Checksum.SHA256: lambda data: hashlib.sha256(data).hexdigest(),
}


@pytest.fixture
def threads():
    pool = HashThreads(4)
    yield pool
    pool.close()


def random_tensors(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for n in sizes]


@pytest.mark.parametrize("algorithm", list(REFERENCE), ids=lambda a: a.value)
def test_threads_give_the_serial_digests_in_order(threads: HashThreads, algorithm) -> None:
    """Scenario: tensors of every size, hashed on the threads: the digests of one thread, in
    the tensors' order, each the library's own digest of the raw bytes."""
    tensors = random_tensors(SIZES) + random_tensors(SIZES[::-1], seed=1)
    serial = list(map(algorithm.of, tensors))
    assert threads.map(algorithm.of, tensors) == serial
    assert serial == [REFERENCE[algorithm](bytes(byte_view(t))) for t in tensors]


@pytest.mark.parametrize("signed", [False, True], ids=["xxh3-128", "sha256"])
@pytest.mark.parametrize("sizes", [[0, 1, 7], [1024] * 8, SIZES], ids=["tiny", "1 KiB", "mixed"])
def test_a_value_hashed_on_threads_is_byte_identical(
    threads: HashThreads, signed: bool, sizes: list[int]
) -> None:
    """Scenario: a value whose layers were hashed on the threads is byte for byte the value
    hashed in the calling thread (the stored format does not depend on the scheduling)."""
    tensors = {f"l{i}.kv": t for i, t in enumerate(random_tensors(sizes, seed=len(sizes)))}
    options = {"fingerprint": "ab" * 16, "parent_id": None, "labels": {"tokens": 16}}
    options["hmac_key"] = HMAC_KEY if signed else None
    key, block_id = "kvtier:2:" + "ab" * 16 + ":" + "9f" * 16, "9f" * 16
    in_series = encode_value(key, block_id, tensors, **options)
    on_threads = encode_value(key, block_id, tensors, hash_map=threads.map, **options)
    assert b"".join(on_threads) == b"".join(in_series)


def test_only_blocks_that_cost_enough_to_hash_use_the_threads() -> None:
    """Scenario: the tier's thresholds: saves hash xxh3-128 blocks on the threads from 8 MiB,
    sha256 ones from 1 MiB (a sha256 byte costs 8 of xxh3); loads check sha256 blocks there from
    8 MiB (smaller ones lost on the 2-core dev box); tiny blocks never (the hand-off costs more)."""
    save, check = RemoteTier.hash_on_threads_bytes, RemoteTier.check_on_threads_bytes
    assert (save, check) == (8 << 20, 64 << 20)
    assert worth_threads(Checksum.SHA256, 1 << 20, save)
    assert not worth_threads(Checksum.SHA256, (1 << 20) - 1, save)
    assert not worth_threads(Checksum.XXH3_128, 1 << 20, save)
    assert worth_threads(Checksum.XXH3_128, 8 << 20, save)
    assert worth_threads(Checksum.SHA256, 8 << 20, check)
    assert not worth_threads(Checksum.SHA256, 4 << 20, check)
    assert not worth_threads(Checksum.XXH3_128, 32 << 20, check)
    for algorithm in Checksum:
        for threshold in (save, check):
            assert not worth_threads(algorithm, 1536, threshold)  # a tiny test model's block


def test_every_call_runs_on_a_hash_thread(threads: HashThreads) -> None:
    """Scenario: map hands every item to the pool's threads, not the caller's."""
    names = threads.map(lambda _: threading.current_thread().name, range(16))
    assert all(name.startswith(THREAD_PREFIX) for name in names), names


def test_a_closed_pool_maps_in_the_calling_thread() -> None:
    """Scenario: a late save or load after the tier closed still hashes, in its own thread."""
    pool = HashThreads(2)
    pool.close()
    names = pool.map(lambda _: threading.current_thread().name, range(3))
    assert names == [threading.current_thread().name] * 3


def test_an_error_comes_after_every_call_is_done(threads: HashThreads) -> None:
    """Scenario: one call raises: map raises it only once the other calls have returned, so no
    thread still reads a tensor the caller reuses."""
    done: list[int] = []

    def work(item: int) -> int:
        if item == 0:
            raise ValueError("bad layer")
        time.sleep(0.02)
        done.append(item)
        return item

    with pytest.raises(ValueError, match="bad layer"):
        threads.map(work, range(4))
    assert sorted(done) == [1, 2, 3]


def test_default_hash_threads_follow_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, expected in [(None, 2), (1, 2), (2, 2), (6, 6), (16, machine.HASH_THREADS_MAX)]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert machine.default_hash_threads() == expected


def test_map_ahead_yields_in_order_from_the_threads(threads: HashThreads) -> None:
    """Scenario: whole items on the threads, results in the items' order, each on a hash
    thread, never more than `window` submitted and not yet taken."""
    submitted: list[int] = []

    def work(item: int) -> tuple[int, str]:
        submitted.append(item)
        time.sleep(0.002 * (item % 3))  # later items may finish first
        return item, threading.current_thread().name

    taken = []
    for item, name in threads.map_ahead(work, range(20), window=3):
        assert len(submitted) <= item + 3
        taken.append(item)
        assert name.startswith(THREAD_PREFIX)
    assert taken == list(range(20))


def test_map_ahead_closed_early_waits_for_its_running_calls(threads: HashThreads) -> None:
    """Scenario: the caller stops after two results (a failed server): closing the generator
    returns only once no call still runs, so the items' memory may be reused."""
    running: list[int] = []

    def work(item: int) -> int:
        running.append(item)
        time.sleep(0.02)
        running.remove(item)
        return item

    ahead = threads.map_ahead(work, range(50), window=8)
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()
    assert running == []


def test_map_ahead_raises_a_calls_error_at_its_own_item(threads: HashThreads) -> None:
    """Scenario: item 2's call raises: items 0 and 1 are yielded, the error comes when item 2
    is taken, and by then no later call still runs."""
    running: list[int] = []

    def work(item: int) -> int:
        if item == 2:
            raise ValueError("bad block")
        running.append(item)
        time.sleep(0.01)
        running.remove(item)
        return item

    taken: list[int] = []
    with pytest.raises(ValueError, match="bad block"):
        for item in threads.map_ahead(work, range(10), window=4):
            taken.append(item)
    assert taken == [0, 1] and running == []


def test_map_ahead_after_close_runs_in_the_calling_thread() -> None:
    """Scenario: a late save after the tier closed still encodes, in its own thread."""
    pool = HashThreads(2)
    pool.close()
    names = list(pool.map_ahead(lambda _: threading.current_thread().name, range(3), window=4))
    assert names == [threading.current_thread().name] * 3
