"""The store that processes share: process areas, the shared area, sweeps, the store-wide budget
and GC, missing versus corrupt, faults mid-run and a close() that never raises.

Processes are simulated by several DiskStores in this process (each has its own area) and by
owner tags of dead processes; tests/test_disk_processes.py uses real processes.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
from pathlib import Path

import format1
import pytest
import torch

import kvtier
from kvtier.controller import TierController
from kvtier.errors import BudgetError, KVTierError
from kvtier.layout import KVGeometry, staging_bytes
from kvtier.tiers.disk import DiskStore, DiskTier
from kvtier.tiers.disk import files as disk_files
from kvtier.tiers.disk.areas import Owner, StoreLayout, namespace, temp_name
from kvtier.tiers.disk.catalog import list_blocks, open_layout, orphans, verify
from kvtier.tiers.disk.format import ReadResult
from kvtier.tiers.disk.holdings import Holdings
from kvtier.tiers.disk.ledger import collect_locked, store_lock, survey

FINGERPRINT = "fp-shared"
GiB = 1 << 30


def _id(index: int) -> str:
    return f"{index:02x}" + "c" * 30


def _block(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {f"l{layer}.kv": torch.randn(16, 2, 1, 2, 8, generator=generator) for layer in range(2)}


def _store(root: Path, budget_bytes: int = GiB) -> DiskStore:
    return DiskStore(root, budget_bytes=budget_bytes, codec="raw", fingerprint=FINGERPRINT)


def _same(left: dict[str, torch.Tensor] | None, right: dict[str, torch.Tensor]) -> bool:
    return left is not None and all(torch.equal(left[name], right[name]) for name in right)


def _shared(root: Path, index: int) -> Path:
    return StoreLayout(root).shared(_id(index))


def _ledger(root: Path) -> int | None:
    with store_lock(StoreLayout(root)) as ledger:
        return ledger.read()


def _dead_owner() -> Owner:
    """An owner tag of a process that is gone: our pid with another start time."""
    return Owner(os.getpid(), 1, namespace(), "dead")


def test_persist_goes_to_the_shared_area_and_outlives_close(tmp_path: Path) -> None:
    """Scenario: `persist` blocks are found by another store after the writer closed; private
    blocks are never seen by another store and go with their writer's close()."""
    writer = _store(tmp_path)
    writer.write_block(_id(1), _block(1), parent_id=None, persist=True)
    writer.write_block(_id(2), _block(2), parent_id=None, persist=False)
    assert _shared(tmp_path, 1).is_file() and not _shared(tmp_path, 2).exists()
    assert (writer.area / _shared(tmp_path, 1).name).stat().st_nlink == 2  # pinned by a link
    reader = _store(tmp_path)
    assert reader.probe(_id(1)) is ReadResult.OK and reader.probe(_id(2)) is ReadResult.MISSING
    writer.close()
    assert not writer.area.exists()
    assert _same(reader.read_block(_id(1)), _block(1))
    assert reader.read_block(_id(2)) is None
    writer.close()  # a second close is a no-op
    with pytest.raises(KVTierError, match="closed"):
        writer.write_block(_id(3), _block(3), parent_id=None)


def test_one_id_in_two_private_areas_survives_the_other_close(tmp_path: Path) -> None:
    """Scenario (issue 9): four processes, one prompt, persist = false: one process deleted, on
    close, the file another had written under the same id, and the others failed with
    StoreCorruptError. Now each has its own file; a vanished file is a miss, never corrupt."""
    stores = [_store(tmp_path) for _ in range(4)]
    for store in stores:
        store.write_block(_id(7), _block(7), parent_id=None, persist=False)
    stores[0].close()
    for store in stores[1:]:
        out = torch.empty(16, 2, 1, 2, 8)
        assert store.read_tensor_into(_id(7), "l1.kv", out) is ReadResult.OK
        assert torch.equal(out, _block(7)["l1.kv"])
    held = stores[1].area / _shared(tmp_path, 7).name
    held.unlink()  # deleted behind the store's back
    out = torch.empty(16, 2, 1, 2, 8)
    assert stores[1].read_tensor_into(_id(7), "l0.kv", out) is ReadResult.MISSING
    assert stores[1].stats()["quarantined"] == 0 and stores[1].bytes_used == 0


def test_missing_and_corrupt_are_told_apart(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_block(_id(1), _block(1), parent_id=None)
    out = torch.empty(16, 2, 1, 2, 8)
    assert store.read_tensor_into(_id(9), "l0.kv", out) is ReadResult.MISSING
    assert not store.read_tensor_into(_id(9), "l0.kv", out)  # falsy, as the mover expects
    path = _shared(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))  # in place: our hard link sees the flip too
    assert store.read_tensor_into(_id(1), "l1.kv", out) is ReadResult.CORRUPT
    assert not path.exists() and not (store.area / path.name).exists()  # every name moved aside
    assert store.read_tensor_into(_id(1), "l1.kv", out) is ReadResult.MISSING
    assert store.stats()["quarantined"] == 1 and store.stats()["missing"] == 3


def test_open_sweeps_dead_areas_and_temps_but_not_live_ones(tmp_path: Path) -> None:
    """Scenario (issue 9): 12 SIGKILLs left 60 block files forever, counted against no budget,
    and empty shard folders piled up. A dead owner's area and temp files go at the next open."""
    live = _store(tmp_path)
    live.write_block(_id(1), _block(1), parent_id=None, persist=False)
    layout = StoreLayout(tmp_path)
    dead = layout.area(_dead_owner())
    dead.mkdir(parents=True)
    (dead / f"{_id(2)}.safetensors").write_bytes(b"x" * 1000)
    shared = layout.shared(_id(3))
    shared.parent.mkdir(parents=True)
    (shared.parent / temp_name(shared, _dead_owner(), 4096)).write_bytes(b"partial")
    (layout.tree / "zz").mkdir()  # an empty shard folder
    assert len(orphans(layout)) == 2
    _store(tmp_path)
    assert not dead.exists() and not shared.parent.exists() and not (layout.tree / "zz").exists()
    assert orphans(layout) == [] and live.read_block(_id(1)) is not None
    assert _ledger(tmp_path) == survey(layout).used_bytes


def test_gc_takes_the_least_recently_used_unpinned_blocks(tmp_path: Path) -> None:
    """Scenario: the budget holds for the whole store: a write that does not fit deletes shared
    blocks no process holds, oldest last use first; blocks in use stay; emptied shards go."""
    probe = _store(tmp_path / "probe")
    size = probe.write_block(_id(0), _block(0), parent_id=None)
    writer = _store(tmp_path, budget_bytes=4 * size)
    for index in range(1, 5):
        writer.write_block(_id(index), _block(index), parent_id=None, persist=True)
    writer.close()  # all four are shared and unpinned now
    for index in (3, 1, 4, 2):  # last use order: 2 is the most recent
        os.utime(_shared(tmp_path, index), ns=(index, 10**9 * (10 + [3, 1, 4, 2].index(index))))
    user = _store(tmp_path, budget_bytes=4 * size)
    assert user.adopt(_id(3)) == size  # in use: never collected while held
    user.write_block(_id(5), _block(5), parent_id=None, persist=True)
    # down to 15/16 of the budget, less the new block: the two least recently used unpinned
    assert [_shared(tmp_path, i).exists() for i in (1, 2, 3, 4, 5)] == [0, 1, 1, 0, 1]
    assert not _shared(tmp_path, 1).parent.exists()  # its emptied shard folder went too
    user.write_block(_id(6), _block(6), parent_id=None, persist=False)  # fits: no GC
    assert _shared(tmp_path, 2).exists()
    user.write_block(_id(7), _block(7), parent_id=None, persist=False)
    assert not _shared(tmp_path, 2).exists() and _shared(tmp_path, 3).exists()  # 3, 5: held
    assert survey(StoreLayout(tmp_path)).used_bytes <= 4 * size
    assert _ledger(tmp_path) == survey(StoreLayout(tmp_path)).used_bytes


def test_store_wide_budget_full_of_blocks_in_use_is_a_budget_error(tmp_path: Path) -> None:
    probe = _store(tmp_path / "probe")
    size = probe.write_block(_id(0), _block(0), parent_id=None)
    first, second = _store(tmp_path, 3 * size), _store(tmp_path, 3 * size)
    for index in (1, 2):
        first.write_block(_id(index), _block(index), parent_id=None, persist=False)
    second.write_block(_id(3), _block(3), parent_id=None, persist=True)
    with pytest.raises(BudgetError, match=r"in use by running processes.*raise disk.budget"):
        second.write_block(_id(4), _block(4), parent_id=None)
    assert [p for p in tmp_path.rglob("*.tmp")] == []
    first.close()
    second.write_block(_id(4), _block(4), parent_id=None)
    assert _same(second.read_block(_id(3)), _block(3))


def test_equal_writes_share_one_file(tmp_path: Path) -> None:
    """Scenario: a store writing a block another process already persisted keeps that file (a
    link, no write); a private write of it links the shared copy too."""
    first, second = _store(tmp_path), _store(tmp_path)
    size = first.write_block(_id(1), _block(1), parent_id=None, persist=True)
    assert second.write_block(_id(1), _block(1), parent_id=None, persist=False) == size
    assert second.stats()["bytes_written"] == 0
    assert _shared(tmp_path, 1).stat().st_nlink == 3
    assert survey(StoreLayout(tmp_path)).used_bytes == size


def test_publish_links_a_private_block_without_rewriting(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_block(_id(1), _block(1), parent_id=None, persist=False)
    assert not store.publish(_id(9))
    assert store.publish(_id(1)) and _shared(tmp_path, 1).is_file()
    assert store.stats()["bytes_written"] == _shared(tmp_path, 1).stat().st_size
    store.close()
    assert _same(_store(tmp_path).read_block(_id(1)), _block(1))


def test_enospc_mid_run_fails_one_write_and_damages_nothing(tmp_path, monkeypatch) -> None:
    store = _store(tmp_path)
    for index in range(3):
        store.write_block(_id(index), _block(index), parent_id=None, persist=index != 1)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk_files.os, "write", full)
    with pytest.raises(KVTierError, match=r"is full \(No space left on device\)"):
        store.write_block(_id(5), _block(5), parent_id=None)
    monkeypatch.undo()
    assert all(_same(store.read_block(_id(i)), _block(i)) for i in range(3))
    assert [p for p in tmp_path.rglob("*.tmp")] == []
    assert _ledger(tmp_path) == survey(StoreLayout(tmp_path)).used_bytes
    _, bad = verify(StoreLayout(tmp_path), move_aside=False)
    assert bad == []
    store.close()


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call that would change the file system fails as on a read-only mount."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    for name in ("unlink", "link", "replace", "rmdir", "utime", "ftruncate", "pwrite"):
        monkeypatch.setattr(os, name, refuse)
    real_open = os.open

    def open_read_only(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse()
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_read_only)


def test_store_turned_read_only_mid_run(tmp_path: Path, monkeypatch, caplog) -> None:
    """Scenario (issue 9): a store turned read-only mid-run: the first close() raised, the
    second returned, and 11 tracked files were orphaned. Now writes fail with one clear error,
    reads go on, close() never raises, and what it could not delete is swept after exit."""
    store = _store(tmp_path)
    for index in range(6):
        store.write_block(_id(index), _block(index), parent_id=None, persist=index % 2 == 0)
    tier = DiskTier(store, _geometry(), persist=False)
    _read_only(monkeypatch)
    with pytest.raises(KVTierError, match="Read-only file system.*writable local directory"):
        store.write_block(_id(9), _block(9), parent_id=None)
    assert all(_same(store.read_block(_id(i)), _block(i)) for i in range(6))
    tier.free(_id(1))  # never raises either
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers"):
        store.close()
        store.close()
    assert any("the first open of this store after" in r.message for r in caplog.records)
    monkeypatch.undo()
    area = store.area
    assert sorted(p.name for p in area.iterdir()) == sorted(
        f"{_id(i)}.safetensors" for i in range(6)
    )
    monkeypatch.setattr(Owner, "alive", lambda owner: owner.tag != store.owner.tag)
    _store(tmp_path)  # the owner of `area` is gone now: the next open sweeps it
    assert not area.exists()
    assert sorted(p.name for p in (tmp_path / "v1").glob("??/*")) == [
        f"{_id(i)}.safetensors" for i in (0, 2, 4)
    ]


def test_close_survives_an_unexpected_failure(tmp_path: Path, monkeypatch, caplog) -> None:
    store = _store(tmp_path)
    store.write_block(_id(1), _block(1), parent_id=None)

    def broken(self: Holdings) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(Holdings, "close", broken)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers"):
        store.close()
    assert any("closing the disk store" in r.message for r in caplog.records)


def test_a_store_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "store.json").write_text('{"format_version": "3"}\n')
    with pytest.raises(KVTierError, match="written by kvtier store format 3; this kvtier reads"):
        _store(tmp_path)
    with pytest.raises(KVTierError, match="format 3"):
        open_layout(tmp_path)
    assert not (tmp_path / "v1").exists()
    assert "3" in (tmp_path / "store.json").read_text()  # left as it was


def test_a_format_1_store_is_opened_and_its_blocks_are_checked_but_never_reused(
    tmp_path: Path,
) -> None:
    """Scenario: a store written by kvtier's format 1 (blake2b-128 block files) after an upgrade:
    a writer raises its marker to 2 (format-1 kvtiers then refuse it); the old blocks stay in
    the one tree, are listed and verified by their own checksum (a flipped bit is caught), and
    GC collects them; format-2 blocks land beside them."""
    layout = StoreLayout(tmp_path)
    (tmp_path / "store.json").write_text('{"format_version": "1"}\n')
    old = format1.write_block(layout.shared(_id(1)), _id(1), _block(1), fingerprint="fp-old")
    format1.write_block(layout.shared(_id(2)), _id(2), _block(2), fingerprint="fp-old")
    open_layout(tmp_path)  # a reader (kvtier store) leaves the marker alone
    assert '"1"' in (tmp_path / "store.json").read_text()
    store = _store(tmp_path)
    assert '"2"' in (tmp_path / "store.json").read_text()
    store.write_block(_id(3), _block(3), parent_id=None, persist=True)
    assert layout.shared(_id(3)).parent == old.parent.parent / _id(3)[:2]  # one tree
    formats = {b.block_id: b.header.format_version for b in list_blocks(layout) if b.header}
    assert formats == {_id(1): "1", _id(2): "1", _id(3): "2"}
    assert verify(layout, move_aside=False) == (3, [])
    data = bytearray(old.read_bytes())
    data[-1] ^= 0x01  # a payload bit of a format-1 file: its blake2b-128 catches it
    old.write_bytes(bytes(data))
    checked, bad = verify(layout, move_aside=False)
    assert checked == 3 and [v.path for v in bad] == [old]
    assert "checksum mismatch" in bad[0].problem
    for index in (1, 2):  # never read by format 2, so their last use is long ago
        os.utime(layout.shared(_id(index)), ns=(10**9 * index, 10**9 * index))
    store.close()
    keep = layout.shared(_id(3)).stat().st_size
    with store_lock(layout) as ledger:
        collect_locked(layout, ledger, max_bytes=keep, target_bytes=keep)
    assert [p.name for p in layout.tree.glob("??/*")] == [layout.shared(_id(3)).name]


def test_unclosed_store_removes_its_area_when_collected(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_block(_id(1), _block(1), parent_id=None, persist=False)
    area = store.area
    del store
    gc.collect()
    assert not area.exists()


# -- DiskTier: what the reuse side calls --------------------------------------------------------
def _geometry(layers: int = 2) -> KVGeometry:
    return KVGeometry(
        layer_ids=tuple(range(layers)),
        layer_devices=(torch.device("cpu"),) * layers,
        batch=1,
        kv_heads=2,
        head_dim=8,
        dtype=torch.float32,
        block_tokens=16,
    )


def test_a_layer_load_after_another_quarantined_the_block_says_corrupt(tmp_path: Path) -> None:
    """Scenario: a streamed step loads a block's layers on several I/O threads; the first to
    find a flipped byte moves the file aside and the others find no file. The tier reports
    them CORRUPT as well, so the step's error says "failed verification" whichever layer it
    waited on first (it said "missing" when the other thread won); the store itself still
    reads the moved block as a plain miss."""
    store = _store(tmp_path)
    tier = DiskTier(store, _geometry(), persist=False)
    layers = tuple(torch.randn(16, 2, 1, 2, 8) for _ in range(2))
    tier.save(_id(1), layers, parent_id=None)
    path = store.area / f"{_id(1)}.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside layer 1
    path.write_bytes(bytes(data))
    out = torch.empty(16, 2, 1, 2, 8)
    assert tier.load_into(_id(1), 1, out) is ReadResult.CORRUPT
    assert not path.exists()
    assert tier.load_into(_id(1), 0, out) is ReadResult.CORRUPT  # the file is gone: it was bad
    assert store.read_tensor_into(_id(1), "l0.kv", out) is ReadResult.MISSING
    assert tier.load_into(_id(2), 0, out) is ReadResult.MISSING  # never stored: a miss


def test_tier_finds_and_loads_blocks_another_process_persisted(tmp_path: Path) -> None:
    """Scenario: process A persists a chain of blocks; process B asks how much of its chain is
    stored, loads one whole block into its own tensors, and adopts another as its disk copy."""
    writer = DiskTier(_store(tmp_path), _geometry(), persist=True, owns_store=True)
    chain = [_id(index) for index in range(4)]
    for index, key in enumerate(chain[:3]):
        layers = tuple(_block(index).values())
        writer.save(key, layers, parent_id=chain[index - 1] if index else None)
    writer.close()
    reader = DiskTier(_store(tmp_path), _geometry(), persist=False, owns_store=True)
    assert reader.stored_prefix(chain) == 3 and reader.stored_prefix(chain[3:]) == 0
    assert reader.probe(chain[1]) is ReadResult.OK and not reader.probe(chain[3])
    layers = [torch.empty(16, 2, 1, 2, 8) for _ in range(2)]
    assert reader.load_block(chain[1], layers) is ReadResult.OK
    assert all(torch.equal(a, b) for a, b in zip(layers, _block(1).values(), strict=True))
    assert reader.load_block(chain[3], layers) is ReadResult.MISSING
    assert reader.adopt(chain[2]) == chain[2] and reader.adopt(chain[3]) is None
    assert reader.bytes_used > 0 and reader.contains(chain[2])
    out = torch.empty(16, 2, 1, 2, 8)
    assert reader.load_into(chain[2], 1, out) and torch.equal(out, _block(2)["l1.kv"])
    reader.free(chain[2])
    assert reader.bytes_used == 0 and _shared(tmp_path, 2).is_file()  # persisted: stays
    reader.close()


def test_tier_records_tokens_and_model_key(tmp_path: Path) -> None:
    store = DiskStore(
        tmp_path, budget_bytes=GiB, codec="raw", fingerprint=FINGERPRINT, model_key="org/m@1"
    )
    tier = DiskTier(store, _geometry(), persist=True)
    tier.save(_id(1), tuple(_block(1).values()), parent_id=None)
    (info,) = list_blocks(StoreLayout(tmp_path))
    assert (info.model, info.tokens, info.where, info.users) == ("org/m@1", 16, "shared", 1)
    assert info.ratio == pytest.approx(1.0) and info.problem is None


def test_controller_close_on_a_store_turned_read_only(tmp_path: Path, monkeypatch) -> None:
    """Scenario (issue 9): a controller whose disk turned read-only mid-run: close() used to
    raise from the disk delete and orphan the tracked files; now it returns, and its files wait
    in its process area for the next sweep."""
    layers = 4  # K/V of a token in every layer outweighs its staging: the GPU has to stream
    geometry = _geometry(layers)
    cfg = kvtier.load_config(
        None,
        block_tokens=16,
        prefill_chunk_tokens=32,
        gpu_budget=staging_bytes(geometry, 224, buffers=2) + 3 * geometry.block_bytes,
        host_budget=2 * geometry.block_bytes,
        disk_path=str(tmp_path),
        disk_codec="raw",
        policy_name="lru",
        policy_sink_tokens=16,
        policy_recent_tokens=16,
    )
    ctl = TierController(cfg, geometry, fingerprint=FINGERPRINT)
    generator = torch.Generator().manual_seed(0)
    for _ in range(7):  # 224 tokens
        ctl.begin_step(32)
        for layer in range(layers):
            ctl.prefetch(layer)
            kv = torch.randn((2, 1, 2, 32, 8), generator=generator)
            ctl.append(layer, kv[0], kv[1])
    area = ctl.disk.store.area
    on_disk = sorted(p.name for p in area.iterdir())
    assert len(on_disk) >= 3, "the test needs blocks on disk"
    _read_only(monkeypatch)
    ctl.close()
    monkeypatch.undo()
    assert sorted(p.name for p in area.iterdir()) == on_disk
    monkeypatch.setattr(Owner, "alive", lambda owner: owner.tag != area.name)
    _store(tmp_path).close()
    assert not area.exists() and list((tmp_path / "v1").glob("??/*")) == []


def test_adopt_over_budget_or_of_a_corrupt_block_leaves_no_link(tmp_path: Path) -> None:
    writer = _store(tmp_path)
    size = writer.write_block(_id(1), _block(1), parent_id=None)
    writer.write_block(_id(2), _block(2), parent_id=None)
    writer.close()
    small = DiskTier(_store(tmp_path, budget_bytes=size - 1), _geometry())
    assert small.adopt(_id(1)) is None and list(small.store.area.iterdir()) == []
    with pytest.raises(BudgetError, match="needs"):
        small.store.adopt(_id(1))
    assert list(small.store.area.iterdir()) == []
    path = _shared(tmp_path, 2)
    path.write_bytes(path.read_bytes()[:-1])  # truncated in place
    roomy = _store(tmp_path)
    assert roomy.adopt(_id(2)) is None and list(roomy.area.iterdir()) == []
    assert not path.exists() and len(list((tmp_path / "quarantine").iterdir())) == 1
    assert roomy.adopt(_id(1)) == size and roomy.adopt(_id(1)) == size


def test_page_cache_probe_tells_cached_from_cold_files(tmp_path: Path) -> None:
    """Scenario: a block just persisted is in the page cache; after its pages are dropped
    (fsync'd, POSIX_FADV_DONTNEED) it is not; a block never stored has no file (None)."""
    writer = DiskTier(_store(tmp_path), _geometry(), persist=True, owns_store=True)
    writer.save(_id(0), tuple(_block(0).values()), parent_id=None)
    assert writer.page_cached(_id(0)) is True
    assert writer.page_cached(_id(1)) is None
    path = StoreLayout(tmp_path).shared(_id(0))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if disk_files.in_page_cache(path):
        writer.close()
        pytest.skip("this file system keeps the pages (tmpfs?): nothing to tell apart")
    assert writer.page_cached(_id(0)) is False and disk_files.in_page_cache(path) is False
    assert disk_files.in_page_cache(tmp_path / "missing.safetensors") is None
    writer.close()
