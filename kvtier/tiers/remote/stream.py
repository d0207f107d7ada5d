"""NodeStream: commands written to one node's connection as they come, every reply read after.

What a pipeline does, without needing every command first: a caller can prepare the next value
while this one is on its way (client.py's put_each); ReplyStream reads the replies one at a time
instead, as they arrive (get_batches). It sends and reads; it never retries, routes or decides
what a failure means (the client does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from kvtier.tiers.remote.replies import ReplyReader

try:
    from valkey.exceptions import ResponseError, ValkeyError
except ImportError:  # pragma: no cover - RemoteClient.connect() refuses first without the extra
    pass


# put_each's writes: commands are written once this many bytes of them wait. One write per
# 1 MiB value cost 7-11 ms more client CPU per 128 values than two or four a write (more
# syscalls and context switches; 2-core dev box, docs/remote.md); larger values go one by one.
WRITE_BYTES = 2 << 20


class NodeStream:
    """Commands to one node on one connection of its pool: `send` each, then `finish`.

    A connection or timeout error ends the stream (`error`; later sends are dropped); an error
    reply is the result of its command only. The connection goes back to the pool in `finish`,
    closed if the stream ended early.
    """

    def __init__(self, client: Any, *, write_bytes: int = 0) -> None:
        """`write_bytes`: commands are written once this many bytes of them wait (0: each at
        once), so small values share one write; the rest is written by `finish`."""
        self.client = client  # a valkey.Valkey of one node
        self.error: BaseException | None = None
        self._connection: Any = None
        self._sent: list[tuple[int, str]] = []  # (caller's index, command name), in order sent
        self._write_bytes = write_bytes
        self._unwritten: list[Any] = []  # packed commands waiting for `write_bytes`
        self._unwritten_bytes = 0

    def send(self, index: int, *args: Any) -> None:
        """Send one command (its arguments' buffers as they are, written by `write_bytes`);
        `index` names its result."""
        if self.error is not None:
            return
        try:
            if self._connection is None:
                self._connection = self.client.connection_pool.get_connection(args[0])
            packed = self._connection.pack_command(*args)
            self._unwritten += packed
            self._unwritten_bytes += sum(len(chunk) for chunk in packed)
            self._sent.append((index, args[0]))
            if self._unwritten_bytes >= self._write_bytes:
                self._write()
        except (ValkeyError, OSError) as error:
            self._end(error)
        except BaseException:
            self._end(None)
            raise

    def _write(self) -> None:
        unwritten, self._unwritten, self._unwritten_bytes = self._unwritten, [], 0
        self._connection.send_packed_command(unwritten)

    def finish(self) -> list[tuple[int, Any]]:
        """(index, reply) of each command answered, in the order sent: the parsed reply (SET's is
        True) or its error reply. Commands the connection failed before answering are missing."""
        replies: list[tuple[int, Any]] = []
        try:
            if self.error is None and self._unwritten:
                self._write()
            for index, command in self._sent if self.error is None else ():
                try:
                    reply = self.client.parse_response(self._connection, command)
                except ResponseError as error:
                    reply = error
                replies.append((index, reply))
        except (ValkeyError, OSError) as error:
            self._end(error)
        except BaseException:
            self._end(None)
            raise
        finally:
            self._release()
        return replies

    def abort(self) -> None:
        """End the stream unread (its caller failed): the connection is closed, not reused."""
        self._end(None)

    def _end(self, error: BaseException | None) -> None:
        """Stop: the connection is in an unknown state (a command half written or unread)."""
        self.error = error or RuntimeError("stream aborted")
        self._unwritten, self._unwritten_bytes = [], 0
        if self._connection is not None:
            self._connection.disconnect()
        self._release()

    def _release(self) -> None:
        if self._connection is not None:
            self.client.connection_pool.release(self._connection)
            self._connection = None


class ReplyStream(NodeStream):
    """A NodeStream whose replies are read one at a time as they arrive (`reply`), straight from
    the socket (replies.py: each value copied once), so a caller can send more commands while
    it reads (a window of MGETs) and use each reply before the next is read.

    Values come back as bytearrays. `finish` only releases the connection: call it once every
    command was answered (or the stream failed); a connection with replies unread is closed.
    """

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._reader: ReplyReader | None = None
        self._answered = 0

    def reply(self) -> tuple[int, Any] | None:
        """(index, reply) of the next command sent and not yet answered; None once the stream
        failed (`error`), or when every command sent was answered."""
        if self.error is not None or self._answered == len(self._sent):
            return None
        try:
            if self._reader is None:
                self._reader = ReplyReader(self._socket())
            reply = self._reader.read()
        except (ValkeyError, OSError) as error:
            self._end(error)
            return None
        except BaseException:
            self._end(None)
            raise
        index, _ = self._sent[self._answered]
        self._answered += 1
        return index, reply

    def mget_batches(self, batches: Sequence[Sequence[str]], window: int) -> Iterator[Any]:
        """One MGET per batch, up to `window` of them sent ahead of the reply being read: each
        batch's reply in order (a list of values, an error reply, or None: the stream failed or
        the batch is empty)."""
        for i, keys in enumerate(batches[:window]):
            if keys:
                self.send(i, "MGET", *keys)
        for i, keys in enumerate(batches):
            answer = self.reply() if keys else None
            if i + window < len(batches) and batches[i + window]:
                self.send(i + window, "MGET", *batches[i + window])
            yield answer[1] if answer is not None else None

    def finish(self) -> list[tuple[int, Any]]:
        """Release the connection (closed if a reply is unread); no replies: `reply` read them."""
        if self.error is None and self._answered < len(self._sent):
            self._end(None)
        self._release()
        return []

    def _socket(self) -> Any:
        """The connection's socket, checked to hold nothing valkey-py's Python parser read ahead
        (libvalkey's reads only the replies it is asked for, and each in full)."""
        unread = getattr(getattr(self._connection._parser, "_buffer", None), "unread_bytes", None)
        if unread is not None and unread():
            raise ValkeyError("a reply was left half read on this connection")
        return self._connection._sock
