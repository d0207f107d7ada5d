"""RemoteClient: batched get/put/delete of byte values on a Valkey server or cluster.

Stores bytes under string keys; it never chooses what to store or evict, and never seals or checks
values (signing.py does). connect() raises RemoteError with the fix; afterwards the data path never
raises: a server that is down, slow or out of memory reads as misses and failed puts, one warning
per cause. Admin calls (scan, info, used_memory_bytes) raise RemoteError instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from kvtier.errors import KVTierError, RemoteError
from kvtier.tiers.remote.connect import Parts, cause_of, reason_for, repeats_outage, scrub
from kvtier.tiers.remote.opening import open_cluster, open_standalone
from kvtier.tiers.remote.stream import WRITE_BYTES, NodeStream, ReplyStream
from kvtier.tiers.remote.url import RemoteSpec

try:
    import valkey
    from valkey.exceptions import SlotNotCoveredError, ValkeyClusterException, ValkeyError
except ImportError:  # pragma: no cover - exercised only without the extra
    valkey = None

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")


RETRY_AFTER_S = 1.0  # a node that failed is skipped (misses at once) for this long
_SCAN_COUNT = 1000
READ_WINDOW = 2  # get_batches' MGETs at the server at once


class RemoteClient:
    """A connection pool (or a cluster client) with batched, failure-tolerant calls.

    Not thread-safe by contract: give each thread its own client or guard calls with a lock.
    """

    def __init__(
        self,
        spec: RemoteSpec,
        *,
        standalone: Any = None,
        cluster: Any = None,
        retry_after_s: float = RETRY_AFTER_S,
        warned: set[str] | None = None,
    ) -> None:
        """Use connect(); this wraps clients that are already connected and checked.

        `warned`: causes already warned about, shared by clients that should warn once between
        them (one per thread of one tier)."""
        self.spec = spec
        self._standalone = standalone
        self._cluster = cluster
        self._retry_after_s = retry_after_s
        self._failed_at: dict[str, float] = {}  # node name -> monotonic time of its last failure
        self._refresh_slots = False
        self._last_refresh = 0.0
        self._warned: set[str] = set() if warned is None else warned
        self._error_counts: dict[str, int] = {}

    @classmethod
    def connect(
        cls,
        spec: RemoteSpec,
        *,
        retry_after_s: float = RETRY_AFTER_S,
        warned: set[str] | None = None,
    ) -> RemoteClient:
        """Connect, authenticate and check the server answers; raise RemoteError if not.

        Blocks for at most about timeout_ms per node it tries. `warned`: see __init__.
        """
        if valkey is None:
            raise KVTierError(
                "the remote tier needs the valkey client: pip install 'kvtier[remote]'"
            )
        if not spec.cluster:
            standalone = open_standalone(spec)
            return cls(spec, standalone=standalone, retry_after_s=retry_after_s, warned=warned)
        cluster = open_cluster(spec)
        return cls(spec, cluster=cluster, retry_after_s=retry_after_s, warned=warned)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, in order; None for a missing key or one on a failed node.

        Never raises for a server problem; waits at most about timeout_ms per unresponsive node.
        """
        found: list[bytes | None] = [None] * len(keys)
        for name, client, slots in self._route(keys):
            commands = [("MGET", *(keys[i] for i in indices)) for indices in slots]
            results = self._run(name, client, commands)
            for indices, result in zip(slots, results, strict=True):
                if isinstance(result, list):
                    for i, value in zip(indices, result, strict=True):
                        found[i] = value
            self._response_errors(name, results)
        return found

    def get_batches(
        self, batches: Sequence[Sequence[str]], *, window: int = READ_WINDOW
    ) -> Iterator[list[Buffer | None]]:
        """Each batch's values (one MGET each: get_many's, bytearrays or None), batch after
        batch as they arrive.

        Pipelined: up to `window` MGETs wait at the server while a batch is used, so a caller
        that checks a batch while the next arrives waits for no round trip but the first, and
        the server buffers at most `window` batches of replies. A standalone server's replies
        are read straight into their values (replies.py), each byte copied once; a cluster's
        go through get_many, a batch at a time. Never raises for a server problem: after a
        failure every value is None. Close the iterator (or exhaust it) to free the connection.
        """
        name = str(self.spec.nodes[0])
        if self._standalone is None or self._skipped(name):
            for keys in batches:  # a cluster's, a batch at a time; a skipped node's: all None
                yield self.get_many(keys)
            return
        stream = ReplyStream(self._standalone)
        try:
            for keys, reply in zip(batches, stream.mget_batches(batches, window), strict=True):
                if isinstance(reply, list) and len(reply) == len(keys):
                    yield reply
                    continue
                if reply is not None:
                    self._response_errors(name, [reply])
                yield [None] * len(keys)
        finally:
            failed = stream.error  # before finish: a caller that stopped early is no failure
            stream.finish()
            if failed is not None:
                self._node_failed(name, cause_of(failed), failed)
            else:
                self._failed_at.pop(name, None)

    def put_many(
        self, items: Sequence[tuple[str, Buffer | Parts]], *, ttl_s: int | None = None
    ) -> bool:
        """Store each (key, value); True if every value was stored (put_each's answers, all).

        Never raises for a server problem: a failed or partial put returns False.
        """
        keys = [key for key, _ in items]
        return all(self.put_each(keys, (value for _, value in items), ttl_s=ttl_s))

    def put_each(
        self,
        keys: Sequence[str],
        values: Iterable[Buffer | Parts],
        *,
        ttl_s: int | None = None,
    ) -> list[bool]:
        """Store the i-th of `values` under `keys[i]`; whether the server acknowledged each.

        Pipelined as `values` yields them: written to its node's connection once WRITE_BYTES
        of values wait there (a large value before the next is taken, so a generator prepares
        the next one meanwhile; small ones a few per write), every reply read after the last.
        Values are sent without copies (Parts too, to a standalone server; to a cluster they
        are joined first); each must stay unchanged until the call returns. `ttl_s` (default: the spec's ttl_s, None for no expiry) makes the keys
        expire. Never raises for a server problem: a value on a node that failed, was skipped
        or refused it (out of memory) is False; once every node failed, `values` is not read on.
        """
        ttl = self.spec.ttl_s if ttl_s is None else ttl_s
        expiry = ("EX", ttl) if ttl else ()
        standalone = self._standalone is not None
        streams: list[tuple[str, NodeStream]] = []
        node_of: list[NodeStream | None] = [None] * len(keys)  # None: no node serves the key
        for name, client, slots in self._route(keys):
            if self._skipped(name):
                continue
            streams.append((name, NodeStream(client, write_bytes=WRITE_BYTES)))
            for i in (i for group in slots for i in group):
                node_of[i] = streams[-1][1]
        try:
            for i, value in enumerate(values):
                if all(stream.error is not None for _, stream in streams):
                    break  # nothing left that could store a value: do not prepare more
                stream = node_of[i]
                if stream is not None:
                    stream.send(i, "SET", keys[i], _sendable(value, standalone=standalone), *expiry)
        except BaseException:  # `values` raised: no reply is read, no connection left half used
            for _, stream in streams:
                stream.abort()
            raise
        stored = [False] * len(keys)
        for name, stream in streams:
            replies = stream.finish()
            for i, reply in replies:
                stored[i] = reply is True
            if stream.error is not None:
                self._node_failed(name, cause_of(stream.error), stream.error)
            else:
                self._failed_at.pop(name, None)
            self._response_errors(name, [reply for _, reply in replies])
        return stored

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys; the number that existed. Keys on a failed node are not counted."""
        deleted = 0
        for name, client, slots in self._route(keys):
            commands = [("DEL", *(keys[i] for i in indices)) for indices in slots]
            results = self._run(name, client, commands)
            deleted += sum(result for result in results if type(result) is int)
            self._response_errors(name, results)
        return deleted

    def get_range_many(self, keys: Sequence[str], start: int, end: int) -> list[bytes | None]:
        """Bytes `start` through `end` (inclusive, as GETRANGE) of each key's value; None for a
        key on a failed node. A missing key reads as b"" (GETRANGE cannot tell it apart)."""
        found = self._per_key(keys, lambda key: [("GETRANGE", key, start, end)])
        return [_typed(results[0], bytes) if results else None for results in found]

    def prefix_many(self, keys: Sequence[str], nbytes: int) -> list[tuple[bytes, int] | None]:
        """Each value's first `nbytes` bytes and its whole length, in one round trip per node:
        (b"", 0) for a missing key, None for a key on a failed node."""
        commands = lambda key: [("GETRANGE", key, 0, nbytes - 1), ("STRLEN", key)]  # noqa: E731
        pairs = [
            (_typed(results[0], bytes), _typed(results[1], int)) if results else (None, None)
            for results in self._per_key(keys, commands)
        ]
        return [None if None in pair else pair for pair in pairs]

    def length_many(self, keys: Sequence[str]) -> list[int | None]:
        """Each value's length in bytes (0: no such key); None for a key on a failed node."""
        found = self._per_key(keys, lambda key: [("STRLEN", key)])
        return [_typed(results[0], int) if results else None for results in found]

    def idle_many(self, keys: Sequence[str]) -> list[int | None]:
        """Seconds since each key was last read or written (OBJECT IDLETIME); None when the key
        is gone, its node failed, or the server's maxmemory-policy is an LFU one."""
        found = self._per_key(keys, lambda key: [("OBJECT", "IDLETIME", key)])
        return [_typed(results[0], int) if results else None for results in found]

    def expire_many(self, keys: Sequence[str], ttl_s: int) -> int:
        """Set each existing key to expire in `ttl_s` seconds; the number that exist."""
        found = self._per_key(keys, lambda key: [("EXPIRE", key, ttl_s)])
        return sum(1 for results in found if results and results[0] in (True, 1))

    def _per_key(
        self, keys: Sequence[str], commands: Callable[[str], list[tuple[Any, ...]]]
    ) -> list[list[Any] | None]:
        """`commands(key)` for every key, pipelined: one round trip per node. Each key's results
        (a value or an exception each), in key order; None for a key on a failed node."""
        found: list[list[Any] | None] = [None] * len(keys)
        for name, client, slots in self._route(keys):
            indices = [i for group in slots for i in group]
            per_key = [commands(keys[i]) for i in indices]
            results = self._run(name, client, [c for group in per_key for c in group])
            self._response_errors(name, results)
            position = 0
            for i, group in zip(indices, per_key, strict=True):
                mine = results[position : position + len(group)]
                position += len(group)
                found[i] = None if all(r is None for r in mine) else mine
        return found

    def scan(self, prefix: str) -> list[str]:
        """Every key that starts with `prefix`, on every primary; raises RemoteError on failure.

        Walks the whole keyspace with SCAN (non-blocking for the server, O(keys) in total).
        """
        pattern = _glob_escape(prefix) + "*"
        keys: list[str] = []
        for name, client in self._primaries():
            found = self._admin(
                name, lambda c=client: list(c.scan_iter(match=pattern, count=_SCAN_COUNT))
            )
            keys.extend(key.decode() for key in found)
        return keys

    def info(self, section: str | None = None) -> dict[str, dict[str, Any]]:
        """INFO of each primary, keyed by "host:port"; raises RemoteError on failure."""
        return {
            name: self._admin(name, lambda c=client: c.info(section) if section else c.info())
            for name, client in self._primaries()
        }

    def used_memory_bytes(self) -> int:
        """Memory the servers use, summed over primaries (INFO used_memory)."""
        return sum(int(info["used_memory"]) for info in self.info("memory").values())

    def ping(self) -> bool:
        """True if every primary answers PING within timeout_ms; never raises."""
        try:
            nodes = self._primaries()
        except ValkeyError:
            return False
        for _, client in nodes:
            try:
                client.ping()
            except ValkeyError:
                return False
        return True

    def close(self) -> None:
        """Close every connection; the client cannot be used afterwards."""
        if self._cluster is not None:
            self._cluster.close()
        if self._standalone is not None:
            self._standalone.connection_pool.disconnect()

    @property
    def error_counts(self) -> dict[str, int]:
        """Failed node calls (or calls with error replies) by cause since connect; a copy."""
        return dict(self._error_counts)

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- routing and failure handling -------------------------------------------------------

    def _route(self, keys: Sequence[str]) -> list[tuple[str, Any, list[list[int]]]]:
        """Group key indices by node, then by hash slot: (node name, node client, slots)."""
        if not keys:
            return []
        if self._standalone is not None:
            return [(str(self.spec.nodes[0]), self._standalone, [list(range(len(keys)))])]
        self._maybe_refresh_slots()
        by_node: dict[str, tuple[Any, dict[int, list[int]]]] = {}
        manager = self._cluster.nodes_manager
        for i, key in enumerate(keys):
            slot = self._cluster.keyslot(key)
            try:
                node = manager.get_node_from_slot(slot)
            except SlotNotCoveredError:
                self._note("slot not covered", "the cluster", f"slot {slot}")
                self._refresh_slots = True
                continue
            entry = by_node.get(node.name)
            if entry is None:
                entry = by_node[node.name] = (self._cluster.get_valkey_connection(node), {})
            entry[1].setdefault(slot, []).append(i)
        return [(name, client, list(slots.values())) for name, (client, slots) in by_node.items()]

    def _run(self, name: str, client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Pipeline `commands` on one node: a result or exception each, all None on node failure."""
        if self._skipped(name):
            return [None] * len(commands)
        pipe = client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        try:
            results = pipe.execute(raise_on_error=False)
        except (ValkeyError, OSError) as exc:
            self._node_failed(name, cause_of(exc), exc)
            return [None] * len(commands)
        self._failed_at.pop(name, None)
        return results

    def _skipped(self, name: str) -> bool:
        """Whether node `name` failed less than retry_after_s ago (its calls miss at once)."""
        if time.monotonic() - self._failed_at.get(name, -float("inf")) >= self._retry_after_s:
            return False
        log.debug("valkey at %s skipped: it failed less than %.1f s ago", name, self._retry_after_s)
        return True

    def _node_failed(self, name: str, cause: str, exc: BaseException) -> None:
        self._failed_at[name] = time.monotonic()
        if self._cluster is not None:
            self._refresh_slots = True  # a failover may have moved its slots to a replica
        self._note(cause, name, scrub(str(exc), self.spec))

    def _response_errors(self, name: str, results: list[Any]) -> None:
        """Note the error replies of one pipeline: one log line per cause, however many commands."""
        first: dict[str, BaseException] = {}
        counts: dict[str, int] = {}
        for result in results:
            if isinstance(result, BaseException):
                cause = cause_of(result)
                first.setdefault(cause, result)
                counts[cause] = counts.get(cause, 0) + 1
        for cause, error in first.items():
            if cause in ("moved", "cluster down"):
                self._refresh_slots = True
            detail = scrub(str(error), self.spec)
            self._note(cause, name, f"{detail}; {counts[cause]} of {len(results)} commands")

    def _note(self, cause: str, where: str, detail: str) -> None:
        self._error_counts[cause] = self._error_counts.get(cause, 0) + 1
        first = cause not in self._warned and not repeats_outage(cause, self._warned)
        self._warned.add(cause)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "remote tier: valkey at %s %s (%s)",
            where,
            reason_for(cause, self.spec),
            detail,
        )

    def _maybe_refresh_slots(self) -> None:
        now = time.monotonic()
        if not self._refresh_slots or now - self._last_refresh < self._retry_after_s:
            return
        self._last_refresh = now
        manager = self._cluster.nodes_manager
        # initialize() asks startup nodes in order until the slots are covered: ask the nodes
        # that answered last time first, so a hung node does not cost a second timeout here.
        manager.startup_nodes = dict(
            sorted(manager.startup_nodes.items(), key=lambda item: item[0] in self._failed_at)
        )
        try:
            manager.initialize()
            self._refresh_slots = False
        except (ValkeyError, ValkeyClusterException, OSError) as exc:
            self._note("unreachable", "every startup node", scrub(str(exc), self.spec))

    def _primaries(self) -> list[tuple[str, Any]]:
        if self._standalone is not None:
            return [(str(self.spec.nodes[0]), self._standalone)]
        return [
            (node.name, self._cluster.get_valkey_connection(node))
            for node in self._cluster.get_primaries()
        ]

    def _admin(self, name: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except ValkeyError as exc:
            raise RemoteError(
                f"valkey at {name} failed: {scrub(str(exc), self.spec)}; check the server is up "
                "and this user may run SCAN and INFO"
            ) from None


def _sendable(value: Buffer | Parts, *, standalone: bool) -> memoryview | Parts:
    """`value` as the packer sends it: cast("B") makes len() the byte count the protocol needs,
    for any buffer layout; a cluster node's packer takes no Parts."""
    if isinstance(value, Parts):
        return value if standalone else memoryview(value.join())
    return memoryview(value).cast("B")


def _typed(result: Any, kind: type) -> Any:
    """`result` if it is a `kind` (and not a bool), else None (an error reply, a nil)."""
    return result if isinstance(result, kind) and not isinstance(result, bool) else None


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
