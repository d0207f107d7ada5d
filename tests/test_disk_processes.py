"""The store under real processes: SIGKILLs at random points of writing, and four processes
sharing one store with persist on and off while another collects. Slow: forks and sleeps."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from store_worker import block_ids, tensors_of

from kvtier import cli
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.disk.areas import StoreLayout
from kvtier.tiers.disk.catalog import orphans
from kvtier.tiers.disk.ledger import store_lock, survey

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("store_worker.py")
BLOCK_FILE_BYTES = 2 * 64 * 2 * 4 * 32 * 4 + 1024  # two fp32 tensors and a header, at most


class ForkServer:
    """tests/store_worker.py in a subprocess: spawn jobs as real processes, wait for them."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def _ask(self, command: dict) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def spawn(self, **job: object) -> int:
        return self._ask({"spawn": job})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["code"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def forks():
    server = ForkServer()
    yield server
    server.close()


def _check_clean(root: Path, budget_bytes: int) -> DiskStore:
    """Open the store (which sweeps), then: no orphan, every file verifies, exact contents."""
    store = DiskStore(root, budget_bytes=budget_bytes, codec="raw", fingerprint="fp-processes")
    layout = StoreLayout(root)
    found = survey(layout)
    assert list(found.areas) == [store.owner.tag] and found.areas[store.owner.tag] == []
    assert found.temps == [] and found.strays == [] and orphans(layout) == []
    assert list(root.rglob("*.tmp")) == [] and list(root.rglob("*.link")) == []
    result = CliRunner().invoke(cli.main, ["store", "verify", str(root)])
    assert result.exit_code == 0, result.output
    for item in found.shared:
        block_id = item.path.name.removesuffix(".safetensors")
        read = store.read_block(block_id)
        assert read is not None and all(read[n].equal(t) for n, t in tensors_of(block_id).items())
    with store_lock(layout) as ledger:
        assert ledger.read() == found.used_bytes <= budget_bytes
    return store


def test_sigkill_at_random_points_of_writing_leaves_no_orphan(tmp_path: Path, forks) -> None:
    """Scenario (issue 9): 12 SIGKILLs left 60 block files forever. Writers (one to three at a
    time, persist on and off, GC under way: the budget holds 8 of 12 blocks) are killed at
    random delays, then at chosen syscalls; the next open sweeps, verify passes, no orphan."""
    root, budget = tmp_path / "store", 8 * BLOCK_FILE_BYTES
    rng = random.Random(9)
    job = {"kind": "write_forever", "root": str(root), "budget_bytes": budget}
    killed = torn = 0
    for round_ in range(16):
        pids = [forks.spawn(**job, seed=round_ * 3 + k) for k in range(rng.randint(1, 3))]
        for pid in pids:
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(pid, signal.SIGKILL)
            assert forks.wait(pid) == -signal.SIGKILL
            killed += 1
        torn += len(survey(StoreLayout(root)).temps)  # files that kills cut off mid-write
    assert killed >= 20
    print(f"{killed} SIGKILLs, {torn} temp files left by them")
    points = [("write", 1), ("fsync", 0), ("replace", 0), ("link", 0), ("link", 1)]
    points += [("pwrite", 1), ("ftruncate", 0), ("unlink", 0), ("utime", 0), ("open", 9)]
    for seed, (name, after) in enumerate(points):
        pid = forks.spawn(**job, seed=100 + seed, die_at=name, after=after, steps=300)
        assert forks.wait(pid) == -signal.SIGKILL, f"never reached os.{name} call {after + 1}"
    _check_clean(root, budget).close()


def test_four_processes_share_one_store_exactly(tmp_path: Path, forks) -> None:
    """Scenario (issue 9): four processes, the same and different block ids, persist on and
    off, closing at different times while a fifth collects everything no process holds: every
    process reads its own blocks back exactly, and another's block is a hit or a miss, never
    corrupt (3 of 4 used to fail with StoreCorruptError)."""
    root = tmp_path / "store"
    common = block_ids("b0", 6)
    unique = [block_ids(f"c{k}", 4) for k in range(4)]
    pids, outs = [], []
    for k in range(4):
        others = [i for j in range(4) if j != k for i in unique[j]]
        outs.append(tmp_path / f"seen{k}.json")
        pids.append(
            forks.spawn(
                kind="share_and_read",
                root=str(root),
                budget_bytes=1 << 30,
                mine=common + unique[k],
                others=others,
                persist=k % 2 == 0,
                read_s=0.4 * (k + 1),
                out=str(outs[-1]),
            )
        )
    collector = forks.spawn(kind="collect", root=str(root), max_bytes=0, seconds=1.5)
    assert [forks.wait(pid) for pid in pids] == [0, 0, 0, 0]
    assert forks.wait(collector) == 0
    seen = [json.loads(out.read_text()) for out in outs]
    assert all(s["corrupt"] == s["wrong"] == 0 and s["ok"] > 0 for s in seen), seen
    store = _check_clean(root, 1 << 30)
    store.close()
