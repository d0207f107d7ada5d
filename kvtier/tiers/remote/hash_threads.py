"""The remote tier's hash threads: one block's layers hashed (a save) or copied out and checked (a
load) side by side, or a batch's small blocks encoded whole side by side (a save), as hashlib,
xxhash and numpy's copies release the GIL on large buffers. Leaf work only: a task never waits on
another task, so a caller may itself be a pool thread (the tier's check threads). Scheduling
only: the digests, the values and their order are those of a serial pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TypeVar

from kvtier.tiers.codec import Checksum

T = TypeVar("T")
R = TypeVar("R")

THREAD_PREFIX = "kvtier-remote-hash"

# Bytes of xxh3-128 one byte of each checksum costs as much as, on one core (2-core dev box,
# codec.Checksum: xxh3-128 10.8-14 GB/s, sha256 1.25-1.6, blake2b-128 0.74-0.79).
XXH3_BYTES_PER_BYTE = {Checksum.XXH3_128: 1, Checksum.SHA256: 8, Checksum.BLAKE2B_128: 16}


def worth_threads(algorithm: Checksum, block_bytes: int, threshold_bytes: int) -> bool:
    """Whether a block of `block_bytes` checksummed with `algorithm` should hash its layers on
    the hash threads: once it costs as much to hash as `threshold_bytes` of xxh3-128.

    Below that the hand-off costs more than it saves (~50 us a map of 8 layers on the 2-core dev
    box; on the 16-core host xxh3 blocks paid from 8 MiB, not at 1 MiB: docs/remote.md), so
    small blocks, signed ones too, hash in the calling thread."""
    return block_bytes * XXH3_BYTES_PER_BYTE[algorithm] >= threshold_bytes


class HashThreads:
    """A few threads that run one function over a block's layers, results in order; owned by one
    RemoteTier and shared by all its calls (saves from the mover's I/O threads, loads' checks)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_PREFIX)

    def map(self, function: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[function(item) for item in items]`, each call on a hash thread; in the calling
        thread after close() (a late save or load still works). Blocks until every call is
        done, so the items (a tensor's own memory) may be used again when it returns; raises
        the first call's exception after all the calls are done."""
        items = list(items)
        try:
            futures = [self._pool.submit(function, item) for item in items]
        except RuntimeError:  # shut down by close()
            return [function(item) for item in items]
        for future in futures:  # all of them: no task still reads an item after an error
            future.exception()
        return [future.result() for future in futures]

    def map_ahead(
        self, function: Callable[[T], R], items: Iterable[T], *, window: int
    ) -> Iterator[R]:
        """`function(item)` for each item, on the hash threads, yielded in order as they are
        taken, with at most `window` calls submitted and not yet taken (what bounds the
        finished results that wait); in the calling thread after close().

        A call's exception is raised when its result is taken. Closing the generator (or an
        error) cancels the calls not started and waits for the running ones: once it is closed
        no thread still reads an item. Close it (contextlib.closing) when not run to the end."""
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(self._submit(function, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)

    def _submit(self, function: Callable[[T], R], item: T) -> Future[R]:
        try:
            return self._pool.submit(function, item)
        except RuntimeError:  # shut down by close(): run it here
            done: Future[R] = Future()
            try:
                done.set_result(function(item))
            except Exception as error:
                done.set_exception(error)
            return done

    def close(self) -> None:
        """Stop the threads once their calls are done; never raises."""
        self._pool.shutdown(wait=True)
