"""NodeStream: commands written to one node's connection as they come, every reply read after.

What a pipeline does, without needing every command first: a caller can prepare the next value
while this one is on its way (client.py's put_each). It sends and reads; it never retries, routes
or decides what a failure means (the client does).
"""

from __future__ import annotations

from typing import Any

try:
    from valkey.exceptions import ResponseError, ValkeyError
except ImportError:  # pragma: no cover - RemoteClient.connect() refuses first without the extra
    pass


class NodeStream:
    """Commands to one node on one connection of its pool: `send` each, then `finish`.

    A connection or timeout error ends the stream (`error`; later sends are dropped); an error
    reply is the result of its command only. The connection goes back to the pool in `finish`,
    closed if the stream ended early.
    """

    def __init__(self, client: Any) -> None:
        self.client = client  # a valkey.Valkey of one node
        self.error: BaseException | None = None
        self._connection: Any = None
        self._sent: list[tuple[int, str]] = []  # (caller's index, command name), in order sent

    def send(self, index: int, *args: Any) -> None:
        """Write one command (its arguments' buffers as they are); `index` names its result."""
        if self.error is not None:
            return
        try:
            if self._connection is None:
                self._connection = self.client.connection_pool.get_connection(args[0])
            self._connection.send_packed_command(self._connection.pack_command(*args))
        except (ValkeyError, OSError) as error:
            self._end(error)
            return
        except BaseException:
            self._end(None)
            raise
        self._sent.append((index, args[0]))

    def finish(self) -> list[tuple[int, Any]]:
        """(index, reply) of each command answered, in the order sent: the parsed reply (SET's is
        True) or its error reply. Commands the connection failed before answering are missing."""
        replies: list[tuple[int, Any]] = []
        try:
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
        if self._connection is not None:
            self._connection.disconnect()
        self._release()

    def _release(self) -> None:
        if self._connection is not None:
            self.client.connection_pool.release(self._connection)
            self._connection = None
