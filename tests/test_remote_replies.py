"""ReplyReader parses RESP2 replies from a socket as valkey-py does, however the bytes arrive."""

from __future__ import annotations

import os
import socket
import threading

import pytest

pytest.importorskip("valkey")
from valkey.exceptions import ConnectionError as ValkeyConnectionError  # noqa: E402
from valkey.exceptions import InvalidResponse, OutOfMemoryError, ResponseError  # noqa: E402

from kvtier.tiers.remote import replies  # noqa: E402
from kvtier.tiers.remote.replies import ReplyReader  # noqa: E402


def reader_of(data: bytes, *, piece: int | None = None) -> ReplyReader:
    """A reader of a socket the other end writes `data` to (in pieces of `piece` bytes), then
    closes."""
    mine, theirs = socket.socketpair()
    mine.settimeout(5)

    def write() -> None:
        step = piece or len(data) or 1
        for start in range(0, len(data), step):
            theirs.sendall(data[start : start + step])
        theirs.close()

    threading.Thread(target=write, daemon=True).start()
    return ReplyReader(mine)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


@pytest.mark.parametrize("piece", [None, 1, 7, 70_000])
def test_replies_of_every_kind(piece: int | None) -> None:
    big = os.urandom(300_000)  # longer than a chunk: read straight into its value
    data = (
        b"*4\r\n" + bulk(b"one") + b"$-1\r\n" + bulk(big) + bulk(b"")
        + b"+OK\r\n:42\r\n*-1\r\n*0\r\n"
        + b"-OOM command not allowed when used memory > 'maxmemory'\r\n-ERR unknown\r\n"
        + bulk(b"a\r\nb")
    )  # fmt: skip
    reader = reader_of(data, piece=piece)
    values = reader.read()
    assert values == [b"one", None, big, b""] and isinstance(values[0], bytearray)
    assert reader.read() == b"OK" and reader.read() == 42
    assert reader.read() is None and reader.read() == []
    assert isinstance(reader.read(), OutOfMemoryError)
    error = reader.read()
    assert type(error) is ResponseError and str(error) == "unknown"
    assert reader.read() == b"a\r\nb"


def test_a_line_longer_than_the_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replies, "CHUNK_BYTES", 8)
    reader = reader_of(b"-ERR " + b"x" * 100 + b"\r\n" + bulk(b"after"))
    assert str(reader.read()) == "x" * 100 and reader.read() == b"after"


@pytest.mark.parametrize("cut", [3, 10, 5000, -1])
def test_a_connection_closed_mid_reply_raises(cut: int) -> None:
    """Scenario: the server dies while a value is on its way: ConnectionError, never a short
    value."""
    data = b"*1\r\n" + bulk(b"v" * 10_000)
    reader = reader_of(data[:cut])
    with pytest.raises(ValkeyConnectionError):
        reader.read()


def test_a_bulk_string_without_its_crlf_is_a_protocol_error() -> None:
    with pytest.raises(InvalidResponse):
        reader_of(b"$3\r\nabcXY").read()
    with pytest.raises(InvalidResponse):
        reader_of(b"?what\r\n").read()


def test_a_parser_buffer_without_unread_bytes_is_no_error() -> None:
    """Scenario: with libvalkey installed, valkey-py's parser keeps a plain bytearray as its
    `_buffer` (no unread_bytes): the stream still reads from the socket; bytes the Python
    parser read ahead end the stream instead."""
    from types import SimpleNamespace

    from valkey.exceptions import ValkeyError

    from kvtier.tiers.remote.stream import ReplyStream

    stream = ReplyStream(None)
    stream._connection = SimpleNamespace(_parser=SimpleNamespace(_buffer=bytearray(8)), _sock=1)
    assert stream._socket() == 1
    ahead = SimpleNamespace(unread_bytes=lambda: 5)
    stream._connection = SimpleNamespace(_parser=SimpleNamespace(_buffer=ahead), _sock=1)
    with pytest.raises(ValkeyError, match="half read"):
        stream._socket()
