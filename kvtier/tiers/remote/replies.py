"""ReplyReader: RESP2 replies read straight from a socket, each bulk string into a buffer of its own.

valkey-py's Python parser copies every byte of a value three times after the kernel's copy into
a 64 KiB chunk (into a BytesIO, out of it, and the slice that drops the CRLF): 0.7-1 GB/s for
values of 1 MiB on the 2-core dev box. Here a value is copied once, by recv_into. It reads and
parses; it never sends, retries or decides what a reply means (stream.py and client.py do).
"""

from __future__ import annotations

import socket
from typing import Any

try:
    from valkey._parsers.base import BaseParser
    from valkey.exceptions import ConnectionError as ValkeyConnectionError
    from valkey.exceptions import InvalidResponse
except ImportError:  # pragma: no cover - RemoteClient.connect() refuses first without the extra
    pass

CHUNK_BYTES = 64 << 10  # what one recv takes for replies' small parts (valkey-py reads as much)


class ReplyReader:
    """Replies from one connection's socket, in order: `read()` one at a time.

    Bulk strings come back as bytearrays (nil as None), arrays as lists, integers as int, status
    replies as bytes, error replies as valkey-py's exception instances (not raised). A closed
    socket raises valkey's ConnectionError; a timeout raises the socket's TimeoutError. The
    socket must have no reply half read by another reader (a fresh stream of commands).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray(CHUNK_BYTES)
        self._view = memoryview(self._buffer)
        self._start = 0  # unread bytes are self._buffer[self._start : self._end]
        self._end = 0

    def read(self) -> Any:
        """The next reply."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            length = int(rest)
            return None if length < 0 else self._bulk(length)
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self.read() for _ in range(count)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return BaseParser.parse_error(rest.decode("utf-8", errors="replace"))
        raise InvalidResponse(f"Protocol Error: {line[:64]!r}")

    def _line(self) -> bytes:
        """The next line, without its CRLF."""
        while True:
            end = self._buffer.find(b"\r\n", self._start, self._end)
            if end >= 0:
                line = bytes(self._view[self._start : end])
                self._start = end + 2
                return line
            self._fill()

    def _bulk(self, length: int) -> bytearray:
        value = bytearray(length)
        target = memoryview(value)
        buffered = min(length, self._end - self._start)
        target[:buffered] = self._view[self._start : self._start + buffered]
        self._start += buffered
        done = buffered
        while done < length:  # the rest straight from the socket into the value
            got = self._sock.recv_into(target[done:])
            if not got:
                raise ValkeyConnectionError("Connection closed by server.")
            done += got
        while self._end - self._start < 2:
            self._fill()
        if self._view[self._start : self._start + 2] != b"\r\n":
            raise InvalidResponse("Protocol Error: a bulk string without its CRLF")
        self._start += 2
        return value

    def _fill(self) -> None:
        """Read more from the socket after the unread bytes (moved to the front first)."""
        unread = self._end - self._start
        if self._start:
            self._view[:unread] = self._view[self._start : self._end]
            self._start, self._end = 0, unread
        if self._end == len(self._buffer):  # a line longer than the buffer: grow it
            self._view.release()
            self._buffer.extend(bytes(len(self._buffer)))
            self._view = memoryview(self._buffer)
        got = self._sock.recv_into(self._view[self._end :])
        if not got:
            raise ValkeyConnectionError("Connection closed by server.")
        self._end += got
