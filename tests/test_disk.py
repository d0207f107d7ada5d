"""DiskStore: bit-exact round trips, atomic writes, and every fault is a miss or a clear error."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file

from kvtier.errors import BudgetError, KVTierError
from kvtier.tiers.codec import Checksum, Codec, encode
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.disk import files as disk_files
from kvtier.tiers.disk.format import HeaderTemplate, Payload, build_header

FINGERPRINT = "fp-test"
BLOCK_ID = "ab" + "0" * 30
GiB = 1 << 30


def _block(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for kind in ("k", "v"):
            # [tokens, kv_heads, head_dim], token-major; low entropy so lz4 has work to do
            values = 1 + 0.05 * torch.randn(16, 2, 8, generator=generator)
            tensors[f"l{layer}.{kind}"] = values.to(dtype)
    return tensors


def _store(root: Path, codec: str | Codec = "shuffle+lz4", **options: object) -> DiskStore:
    options.setdefault("budget_bytes", GiB)
    return DiskStore(root, codec=codec, fingerprint=FINGERPRINT, **options)


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return list(left) == list(right) and all(
        left[name].shape == right[name].shape
        and left[name].dtype == right[name].dtype
        and torch.equal(_raw(left[name]), _raw(right[name]))
        for name in left
    )


def _path(root: Path, block_id: str = BLOCK_ID) -> Path:
    return root / "v1" / block_id[:2] / f"{block_id}.safetensors"


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _data_files(root: Path) -> list[Path]:
    """Block and temp files anywhere under root (not the store's marker, lock or folders)."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".tmp")
    )


def _shared_files(root: Path) -> list[Path]:
    """Files of the shared area (v1/<shard>/), where persisted blocks live."""
    return sorted(p for p in (root / "v1").glob("??/*") if p.is_file())


def _header_bytes(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("codec", [*Codec, "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip(tmp_path: Path, codec: Codec | str, dtype: torch.dtype) -> None:
    store = _store(tmp_path, codec)
    tensors = _block(dtype=dtype)
    size = store.write_block(BLOCK_ID, tensors, parent_id=None)
    assert size == _path(tmp_path).stat().st_size == store.bytes_used
    assert store.contains(BLOCK_ID)
    assert _same(store.read_block(BLOCK_ID), tensors)
    assert _same(store.read_block(BLOCK_ID, names=["l1.v"]), {"l1.v": tensors["l1.v"]})
    assert store.stats()["codec"] in {member.value for member in Codec}


def test_odd_shapes_round_trip(tmp_path: Path) -> None:
    tensors = {
        "scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "empty": torch.empty(0, 4, dtype=torch.float16),
        "odd": torch.randn(3, 1, 7),
        "ids": torch.arange(5),
    }
    for codec in Codec:
        store = _store(tmp_path / codec.name, codec)
        store.write_block(BLOCK_ID, tensors, parent_id="cd" * 16)
        assert _same(store.read_block(BLOCK_ID), tensors)


def test_file_is_plain_safetensors_with_metadata(tmp_path: Path) -> None:
    tensors = _block()
    _store(tmp_path / "raw", Codec.RAW).write_block(BLOCK_ID, tensors, parent_id="p1")
    assert _same(load_file(_path(tmp_path / "raw")), tensors)
    _store(tmp_path / "lz", Codec.SHUFFLE_LZ4).write_block(BLOCK_ID, tensors, parent_id=None)
    with safe_open(_path(tmp_path / "lz"), framework="pt") as file:
        metadata = file.metadata()
        assert file.get_tensor("l0.k").dtype == torch.uint8
    assert metadata["format_version"] == "2" and metadata["checksum_algorithm"] == "xxh3-128"
    assert metadata["fingerprint"] == FINGERPRINT and metadata["block_id"] == BLOCK_ID
    assert metadata["parent_id"] == ""
    described = json.loads(metadata["tensors"])["l0.k"]
    raw = tensors["l0.k"].reshape(-1).view(torch.uint8).numpy()
    assert described["checksum"] == xxhash.xxh3_128_hexdigest(raw)  # what the name says


def test_read_tensor_into_one_name(tmp_path: Path) -> None:
    for codec in Codec:
        store = _store(tmp_path / codec.name, codec)
        tensors = _block()
        store.write_block(BLOCK_ID, tensors, parent_id=None)
        slab = torch.zeros(1000, dtype=torch.bfloat16)
        out = slab[100 : 100 + 256]  # a flat view of the right numel, as the host pool hands out
        assert store.read_tensor_into(BLOCK_ID, "l1.k", out)
        assert torch.equal(out.view(torch.uint8), tensors["l1.k"].reshape(-1).view(torch.uint8))
        assert torch.count_nonzero(slab[:100]) == 0 and torch.count_nonzero(slab[356:]) == 0
        assert not store.read_tensor_into("cd" + "0" * 30, "l1.k", out)


def test_read_tensor_into_wrong_buffer_says_what_was_expected(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_block(BLOCK_ID, _block(), parent_id=None)
    with pytest.raises(KVTierError, match=r"torch.bfloat16 \[16, 2, 8\]"):
        store.read_tensor_into(BLOCK_ID, "l0.k", torch.empty(256, dtype=torch.float32))
    with pytest.raises(KVTierError, match="holds"):
        store.read_tensor_into(BLOCK_ID, "l0.k", torch.empty(255, dtype=torch.bfloat16))
    with pytest.raises(KVTierError, match="no tensor"):
        store.read_block(BLOCK_ID, names=["l9.k"])


def test_miss_is_none(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.read_block(BLOCK_ID) is None
    assert not store.contains(BLOCK_ID)


@pytest.mark.parametrize("codec", list(Codec))
def test_flipped_data_byte_is_quarantined(
    tmp_path: Path, codec: Codec, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path, codec)
    store.write_block(BLOCK_ID, _block(), parent_id=None)
    path = _path(tmp_path)
    _flip(path, _header_bytes(path) + 40)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers"):
        assert store.read_block(BLOCK_ID) is None
    assert not path.exists()
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    assert store.stats()["quarantined"] == 1 and store.bytes_used == 0
    assert any("failed verification" in record.message for record in caplog.records)
    assert store.read_block(BLOCK_ID) is None  # now a plain miss


def test_flipped_byte_via_read_tensor_into(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_block(BLOCK_ID, _block(), parent_id=None)
    path = _path(tmp_path)
    _flip(path, path.stat().st_size - 5)  # inside the last tensor, l1.v
    out = torch.empty(16, 2, 8, dtype=torch.bfloat16)
    assert not store.read_tensor_into(BLOCK_ID, "l1.v", out)
    assert not path.exists()


def test_warns_once_per_cause(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = _store(tmp_path)
    ids = ["ab" + str(index) * 30 for index in range(3)]
    for block_id in ids:
        store.write_block(block_id, _block(), parent_id=None)
        path = _path(tmp_path, block_id)
        _flip(path, path.stat().st_size - 1)
    with caplog.at_level(logging.WARNING, logger="kvtier.tiers"):
        assert all(store.read_block(block_id) is None for block_id in ids)
    assert len(caplog.records) == 1
    assert store.stats()["quarantined"] == 3


@pytest.mark.parametrize("codec", [Codec.RAW, Codec.SHUFFLE_LZ4])
def test_every_flipped_header_byte_is_a_miss(tmp_path: Path, codec: Codec) -> None:
    """Scenario: bit rot anywhere in the length field or JSON header is caught, even in parent_id."""
    tensors = {"l0.k": _block()["l0.k"], "l0.v": _block(1)["l0.v"]}
    _store(tmp_path / "clean", codec).write_block(BLOCK_ID, tensors, parent_id="p" * 32)
    original = _path(tmp_path / "clean").read_bytes()
    store = _store(tmp_path / "faulty", codec)
    path = _path(tmp_path / "faulty")
    path.parent.mkdir(parents=True)
    for offset in range(_header_bytes(_path(tmp_path / "clean"))):
        data = bytearray(original)
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        assert store.read_block(BLOCK_ID) is None, f"flip at byte {offset} went unnoticed"
        assert not path.exists()


def test_flipped_length_field_and_garbage(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_block(BLOCK_ID, _block(), parent_id=None)
    path = _path(tmp_path)
    _flip(path, 6)  # header length becomes huge
    assert store.read_block(BLOCK_ID) is None
    path.write_bytes(b"not a safetensors file at all")
    assert store.read_block(BLOCK_ID) is None
    path.write_bytes(b"")
    assert store.read_block(BLOCK_ID) is None


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.99])
def test_truncated_file_is_a_miss(tmp_path: Path, keep: float) -> None:
    """Scenario: a torn write (no rename discipline, e.g. a copied store) leaves a short file."""
    store = _store(tmp_path)
    store.write_block(BLOCK_ID, _block(), parent_id=None)
    path = _path(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    assert store.read_block(BLOCK_ID) is None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: int(len(data) * keep)])
    assert not store.read_tensor_into(BLOCK_ID, "l0.k", torch.empty(256, dtype=torch.bfloat16))


def test_leftover_temp_file_is_ignored(tmp_path: Path) -> None:
    """Scenario: a writer killed before its rename leaves `.<id>.safetensors.<pid>.<rand>.tmp`."""
    store = _store(tmp_path)
    path = _path(tmp_path)
    path.parent.mkdir(parents=True)
    temp = path.with_name(f".{path.name}.999.deadbeef.tmp")
    temp.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{partial")
    assert not store.contains(BLOCK_ID)
    assert store.read_block(BLOCK_ID) is None
    tensors = _block()
    store.write_block(BLOCK_ID, tensors, parent_id=None)
    assert _same(store.read_block(BLOCK_ID), tensors)
    store.clear()
    assert temp.exists()  # not ours to delete; GC handles stale temp files


def test_existing_id_is_a_no_op(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tensors = _block()
    size = store.write_block(BLOCK_ID, tensors, parent_id=None)
    mtime = _path(tmp_path).stat().st_mtime_ns
    assert store.write_block(BLOCK_ID, tensors, parent_id=None) == size
    assert _path(tmp_path).stat().st_mtime_ns == mtime
    assert store.stats()["bytes_written"] == size and store.bytes_used == size
    other = _store(tmp_path, Codec.RAW)  # another process sees the file and adopts it
    assert other.write_block(BLOCK_ID, tensors, parent_id=None) == size
    assert other.bytes_used == size and other.stats()["bytes_written"] == 0


def test_corrupt_existing_file_is_rewritten(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tensors = _block()
    store.write_block(BLOCK_ID, tensors, parent_id=None)
    _path(tmp_path).write_bytes(b"junk")
    store.write_block(BLOCK_ID, tensors, parent_id=None)
    assert _same(store.read_block(BLOCK_ID), tensors)
    assert store.stats()["quarantined"] == 1


def test_budget_exceeded_names_the_numbers(tmp_path: Path) -> None:
    probe = _store(tmp_path / "probe", Codec.RAW)
    size = probe.write_block(BLOCK_ID, _block(), parent_id=None)
    store = _store(tmp_path / "store", Codec.RAW, budget_bytes=size + 10)
    store.write_block(BLOCK_ID, _block(), parent_id=None)
    other = "cd" + "0" * 30
    with pytest.raises(BudgetError, match=rf"needs {size} bytes .* has 10 of its {size + 10}-byte"):
        store.write_block(other, _block(1), parent_id=None)
    assert not store.contains(other) and store.bytes_used == size
    store.delete(BLOCK_ID)
    store.write_block(other, _block(1), parent_id=None)
    assert store.bytes_used == size


def test_enospc_is_a_clear_error_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(tmp_path)
    written = []

    def full_disk(fd: int, data: object) -> int:
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(fd)
        return real_write(fd, memoryview(data)[:10])

    real_write = os.write
    monkeypatch.setattr(disk_files.os, "write", full_disk)
    with pytest.raises(KVTierError, match=r"is full \(No space left on device\).*disk.budget"):
        store.write_block(BLOCK_ID, _block(), parent_id=None)
    monkeypatch.undo()
    assert written  # it failed part-way through the file
    assert _data_files(tmp_path) == []
    assert store.bytes_used == 0 and store.stats()["blocks"] == 0
    store.write_block(BLOCK_ID, _block(), parent_id=None)  # budget reservation was released
    assert store.read_block(BLOCK_ID) is not None


def test_other_os_error_is_a_kvtier_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)

    def refuse(*args: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(disk_files.os, "fsync", refuse)
    with pytest.raises(KVTierError, match="could not write"):
        store.write_block(BLOCK_ID, _block(), parent_id=None)
    monkeypatch.undo()
    assert _data_files(tmp_path) == []


def test_two_stores_write_one_id_concurrently(tmp_path: Path) -> None:
    stores = [_store(tmp_path), _store(tmp_path)]
    tensors = _block()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def write(store: DiskStore) -> None:
        try:
            barrier.wait()
            store.write_block(BLOCK_ID, tensors, parent_id=None)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(stores[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # one shared file, and in each store's process area a hard link to it (or a private copy,
    # when its write lost the race); no temp file anywhere
    assert _shared_files(tmp_path) == [_path(tmp_path)]
    assert [p for p in _data_files(tmp_path) if p.suffix == ".tmp"] == []
    for store in stores:
        assert _same(store.read_block(BLOCK_ID), tensors)
        assert (store.area / _path(tmp_path).name).is_file()
        assert store.bytes_used == _path(tmp_path).stat().st_size and store.stats()["blocks"] == 1


def test_many_threads_many_blocks_keep_exact_accounting(tmp_path: Path) -> None:
    store = _store(tmp_path, "auto")
    ids = [f"{index:02x}" + "e" * 30 for index in range(24)]
    threads = [
        threading.Thread(
            target=store.write_block, args=(block_id, _block(index)), kwargs={"parent_id": None}
        )
        for index, block_id in enumerate(ids)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    on_disk = sum(_path(tmp_path, block_id).stat().st_size for block_id in ids)
    assert store.bytes_used == on_disk == store.stats()["bytes_written"]
    assert all(
        _same(store.read_block(block_id), _block(index)) for index, block_id in enumerate(ids)
    )


def test_delete_clear_bytes_used_and_stats(tmp_path: Path) -> None:
    """Blocks written without persist are this store's alone: delete and clear remove them.
    (Before the shared store, delete removed any block's file, persisted or not.)"""
    store = _store(tmp_path)
    first, second = "ab" + "1" * 30, "cd" + "2" * 30
    size_first = store.write_block(first, _block(1), parent_id=None, persist=False)
    size_second = store.write_block(second, _block(2), parent_id=first, persist=False)
    assert store.bytes_used == size_first + size_second
    store.read_block(first)
    stats = store.stats()
    assert stats["blocks"] == 2 and stats["bytes_written"] == size_first + size_second
    assert stats["bytes_read"] == size_first and stats["codec"] == "shuffle+lz4"
    assert stats["write_s"] > 0 and stats["read_s"] > 0 and stats["quarantined"] == 0
    store.delete(first)
    store.delete(first)  # missing is fine
    assert not store.contains(first) and store.bytes_used == size_second
    foreign = _path(tmp_path, "ef" + "3" * 30)
    _store(tmp_path).write_block("ef" + "3" * 30, _block(3), parent_id=None)
    store.clear()
    assert store.bytes_used == 0 and store.stats()["blocks"] == 0
    assert not store.contains(second) and foreign.exists()  # another store's block stays


def test_auto_codec_is_fixed_at_first_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path, "auto")
    assert store.stats()["codec"] == "auto"
    with caplog.at_level(logging.INFO, logger="kvtier.tiers"):
        store.write_block(BLOCK_ID, _block(), parent_id=None)
    chosen = store.stats()["codec"]
    assert chosen in {member.value for member in Codec}
    assert any("codec auto chose" in record.message for record in caplog.records)
    store.write_block("cd" + "0" * 30, _block(1), parent_id=BLOCK_ID)
    assert store.stats()["codec"] == chosen


def test_bad_arguments_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(KVTierError, match="'auto' or"):
        _store(tmp_path, "zstd")
    with pytest.raises(KVTierError, match="byte count"):
        _store(tmp_path, budget_bytes=-1)
    store = _store(tmp_path)
    with pytest.raises(KVTierError, match="block id"):
        store.write_block("../escape", _block(), parent_id=None)
    with pytest.raises(KVTierError, match="contiguous"):
        store.write_block(BLOCK_ID, {"l0.k": torch.randn(4, 4).t()}, parent_id=None)


@pytest.mark.parametrize("algorithm", [Checksum.XXH3_128, Checksum.SHA256])
@pytest.mark.parametrize("labels", [{}, {"model_key": "org/model 100%", "tokens": 256}])
def test_header_template_writes_build_headers_bytes(algorithm: Checksum, labels: dict) -> None:
    """HeaderTemplate's headers are build_header's, byte for byte, for any plain ids and
    checksums; what it does not cover (other shapes or dtypes, ids JSON escapes) is None."""
    tensors = {f"l{i}.kv": torch.randn(16, 2, 1, 3, 8).to(torch.bfloat16) for i in range(3)}
    template = HeaderTemplate("f00d" * 8, tensors, labels=labels, algorithm=algorithm)
    layers = list(tensors.values())
    for block_id, parent_id in [("ab" * 16, None), ("0" * 32, "cd" * 16), ("x", "")]:
        layers[0] = torch.randn_like(layers[0])
        digests = [algorithm.of(t) for t in layers]
        payloads = [
            Payload(name, t, Codec.RAW, encode(t, Codec.RAW), digest)
            for name, t, digest in zip(tensors, layers, digests, strict=True)
        ]
        expected = build_header(
            block_id, "f00d" * 8, parent_id, payloads, labels=labels, algorithm=algorithm
        )
        assert template.build(block_id, parent_id, layers, digests) == expected
    digests = [algorithm.of(t) for t in layers]
    assert template.build('a"b', None, layers, digests) is None
    assert template.build("ab", "c\\d", layers, digests) is None
    assert template.build("ab", None, [*layers[:2], layers[2].float()], digests) is None
    assert template.build("ab", None, [*layers[:2], layers[2][:8]], digests) is None
    assert template.build("ab", None, layers[:2], digests[:2]) is None
    assert HeaderTemplate('"', tensors).build("ab", None, layers, digests) is None
    lookalike = {"model_key": "kvtierslotbx"}  # a label that reads like a slot
    assert HeaderTemplate("f", tensors, labels=lookalike).build("ab", None, layers, digests) is None


def _many_layers(layers: int = 40) -> dict[str, torch.Tensor]:
    """A raw block of 64 KiB tensors: several of blockio.READ_GROUP_BYTES' groups."""
    generator = torch.Generator().manual_seed(3)
    return {
        f"l{layer}.kv": torch.randn(16, 2, 8, 128, generator=generator).to(torch.bfloat16)
        for layer in range(layers)
    }


@pytest.mark.parametrize("where", [0.02, 0.5, 0.98], ids=["first-group", "middle", "last"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_grouped_raw_reads_catch_damage_in_any_group(
    tmp_path: Path, where: float, damage: str
) -> None:
    """Scenario: raw payloads read a group at a time (one preadv each, then checked): a block
    of 40 tensors (2.5 MiB) round-trips into given buffers; a flipped byte or a cut in the
    first, a middle or the last group is a miss (quarantined), never returned data."""
    from kvtier.tiers.disk import blockio

    tensors = _many_layers()
    assert sum(t.nbytes for t in tensors.values()) > 2 * blockio.READ_GROUP_BYTES
    store = _store(tmp_path, Codec.RAW)
    store.write_block(BLOCK_ID, tensors, parent_id=None)
    outs = {name: torch.empty_like(tensor) for name, tensor in tensors.items()}
    assert store.read_into(BLOCK_ID, outs) and _same(outs, tensors)
    path = _path(tmp_path)
    start = _header_bytes(path)
    offset = start + int((path.stat().st_size - start) * where)
    if damage == "flip":
        _flip(path, offset)
    else:
        path.write_bytes(path.read_bytes()[:offset])
    assert not store.read_into(BLOCK_ID, outs)
    assert not path.exists() and any((tmp_path / "quarantine").iterdir())


def test_reads_and_the_page_cache_probe_work_without_preadv(tmp_path: Path, monkeypatch) -> None:
    """Scenario: a platform without os.preadv / RWF_NOWAIT (macOS before 11): grouped raw reads
    fall back to a seek and readv, exact; the page-cache probe says "not cached" for a file and
    None for no file, so the cost model uses the disk's speed."""
    monkeypatch.setattr(disk_files, "_preadv", None)
    tensors = _many_layers()
    store = _store(tmp_path, Codec.RAW)
    store.write_block(BLOCK_ID, tensors, parent_id=None)
    outs = {name: torch.empty_like(tensor) for name, tensor in tensors.items()}
    assert store.read_into(BLOCK_ID, outs) and _same(outs, tensors)
    assert store.in_page_cache(BLOCK_ID) is False
    assert store.in_page_cache("cd" + "0" * 30) is None
