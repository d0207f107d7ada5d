"""kvtier/measured.py: the saved `kvtier bench` results, and who reads them (codec = "auto")."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from kvtier import measured
from kvtier.tiers.codec import CodecChoice


@pytest.fixture(autouse=True)
def cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _disk_entry(path, write=0.5, read=2.5):
    return {
        "path": str(path),
        "device": measured.file_system_id(path),
        "write_gbps": write,
        "read_gbps": read,
        "measured_at": "2030-01-02T03:04:05",
    }


def test_nothing_measured_means_assumed(tmp_path):
    speeds = measured.disk_speeds(tmp_path / "store")
    assert not speeds.write.measured and speeds.write.gbps == measured.ASSUMED_DISK_WRITE_GBPS
    assert speeds.read.gbps == measured.ASSUMED_DISK_READ_GBPS
    assert "kvtier bench" in speeds.read.source
    copy = measured.copy_speed(1 << 20, kind="pinned_h2d")
    assert copy.gbps == measured.ASSUMED_COPY_GBPS and not copy.measured


def test_saved_disk_speeds_apply_to_any_path_on_that_file_system(tmp_path, cache_home):
    path = measured.write_bench({"disk": [_disk_entry(tmp_path)], "measured_at": "2030-01-02"})
    assert path == cache_home / "kvtier" / "bench.json"
    speeds = measured.disk_speeds(tmp_path / "not" / "made" / "yet")
    assert speeds.write.measured and (speeds.write.gbps, speeds.read.gbps) == (0.5, 2.5)
    assert speeds.read.source == f"measured at {tmp_path} on 2030-01-02"
    assert speeds.load == speeds.read  # a bench file from before parallel reads were measured
    parallel = {**_disk_entry(tmp_path), "parallel_read_gbps": 4.0, "read_threads": 8}
    measured.write_bench({"disk": [parallel]})
    load = measured.disk_speeds(tmp_path).load
    assert load.gbps == 4.0 and load.source.endswith("8 threads")  # what a prefix load uses


def test_a_new_bench_keeps_other_file_systems_and_replaces_this_one(tmp_path):
    other = {**_disk_entry(tmp_path), "device": -1, "path": "/elsewhere"}
    measured.write_bench({"disk": [other, _disk_entry(tmp_path)]})
    measured.write_bench({"disk": [_disk_entry(tmp_path, write=0.9)]})
    disks = measured.read_bench()["disk"]
    assert sorted(d["path"] for d in disks) == sorted(["/elsewhere", str(tmp_path)])
    assert measured.disk_speeds(tmp_path).write.gbps == 0.9


def test_copy_speed_takes_the_measured_size_at_or_below(tmp_path):
    rows = [{"kind": "host_memcpy", "bytes": 1 << k, "gbps": float(k)} for k in (16, 20, 24)]
    measured.write_bench({"copies": rows, "measured_at": "2030-01-02"})
    assert measured.copy_speed(3 << 20, kind="host_memcpy").gbps == 20.0
    assert measured.copy_speed(1, kind="host_memcpy").gbps == 16.0  # smaller than any measured
    assert not measured.copy_speed(1 << 20, kind="pinned_h2d").measured


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": 99}), json.dumps([1])])
def test_a_broken_bench_file_is_ignored_with_a_warning(text, cache_home, caplog, tmp_path):
    (cache_home / "kvtier").mkdir(parents=True)
    (cache_home / "kvtier" / "bench.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="kvtier.measured"):
        assert not measured.disk_speeds(tmp_path).read.measured
    assert "kvtier bench" in caplog.text


def _choose(where, caplog) -> str:
    choice = CodecChoice("auto")
    with caplog.at_level(logging.INFO, logger="kvtier.tiers.codec"):
        choice.resolve({"l0.kv": torch.randn(4096, dtype=torch.float32)}, where=where)
    return caplog.text


def test_codec_auto_says_assumed_without_a_bench(tmp_path, caplog):
    """Scenario (issue 10): codec auto logged "assuming disk 1.30 GB/s write" as if measured."""
    text = _choose(tmp_path, caplog)
    assert "1.30 GB/s write, 1.90 GB/s read: assumed" in text


def test_codec_auto_weighs_the_measured_disk(tmp_path, caplog):
    measured.write_bench({"disk": [_disk_entry(tmp_path, write=0.25, read=0.75)]})
    text = _choose(tmp_path / "store", caplog)
    assert f"0.25 GB/s write, 0.75 GB/s read: measured at {tmp_path} on 2030-01-02" in text


def test_remote_speed_is_filed_by_server_and_assumed_elsewhere():
    from kvtier.tiers.remote.url import parse_remote

    spec = parse_remote({"url": "valkey://kv:secret@10.0.0.5:6379/2"})
    assert measured.remote_nodes(spec) == "10.0.0.5:6379/2"
    assumed = measured.remote_speed(spec)
    assert (assumed.gbps, assumed.source, assumed.measured) == (0.3, "assumed", False)
    entry = {"nodes": "10.0.0.5:6379/2", "load_gbps": 1.5, "measured_at": "2030-01-02T03:04:05"}
    failed = {"nodes": "10.0.0.6:6379/0", "error": "down"}
    measured.write_bench({"remote": [entry, failed]})
    assert measured.read_bench()["remote"] == [entry], "a failed measurement is not saved"
    speed = measured.remote_speed(parse_remote({"url": "valkey://10.0.0.5:6379/2"}))
    assert speed.measured and speed.gbps == 1.5
    assert speed.source == "measured by kvtier bench on 2030-01-02"
    assert not measured.remote_speed(parse_remote({"url": "valkey://10.0.0.5:6379"})).measured


def test_learned_figures_keep_the_fastest_prefill_and_the_latest_load_scale(cache_home):
    """Scenario: a prefill speed saved for one device and model is read back under that key
    only; a slower later figure does not replace it, a faster one does; a load calibration is
    replaced by the latest; a broken file is ignored and replaced by the next save; a new
    `kvtier bench` drops the load calibrations (they were relative to the old figures)."""
    key = measured.prefill_key("NVIDIA H200", "fp1")
    assert measured.read_learned("prefill", key) is None
    assert measured.save_learned("prefill", key, 300e12, only_if_higher=True)
    assert not measured.save_learned("prefill", key, 100e12, only_if_higher=True)
    assert measured.read_learned("prefill", key)[0] == 300e12
    assert measured.read_learned("prefill", measured.prefill_key("cpu", "fp1")) is None
    assert measured.save_learned("prefill", key, 400e12, only_if_higher=True)
    rate, date = measured.read_learned("prefill", key)
    assert rate == 400e12 and len(date) == 10
    disk = measured.load_key("NVIDIA H200", "DISK")
    assert measured.save_learned("loads", disk, 0.4) and measured.save_learned("loads", disk, 0.5)
    assert measured.read_learned("loads", disk)[0] == 0.5
    measured.write_bench({"disk": []})
    assert measured.read_learned("loads", disk) is None
    assert measured.read_learned("prefill", key)[0] == 400e12
    measured.learned_file().write_text("{not json")
    assert measured.read_learned("prefill", key) is None
    assert measured.save_learned("prefill", key, 1e12, only_if_higher=True)
    assert measured.read_learned("prefill", key)[0] == 1e12


def test_figures_saved_soon_are_written_off_the_callers_thread_and_in_order(
    cache_home, monkeypatch
) -> None:
    """Scenario: a prefix load queues its calibration (save_learned_soon) while the file system
    is slow: the caller does not wait; the readers (and a closing cache) wait for the write;
    queued figures land in the order given; a new `kvtier bench` drops queued load figures."""
    import threading

    gate = threading.Event()
    save = measured.save_learned

    def slow_save(*args, **kwargs):
        gate.wait(5)
        return save(*args, **kwargs)

    monkeypatch.setattr(measured, "save_learned", slow_save)
    disk = measured.load_key("NVIDIA H200", "DISK")
    measured.save_learned_soon("loads", disk, 0.4)
    measured.save_learned_soon("loads", disk, 0.7)
    assert not measured.learned_file().exists()  # queued, not written: the caller went on
    gate.set()
    assert measured.read_learned("loads", disk)[0] == 0.7  # the reader waited for both
    measured.save_learned_soon("loads", disk, 0.9)
    measured.write_bench({"disk": []})  # forgets the load figures, the queued one too
    assert measured.read_learned("loads", disk) is None
