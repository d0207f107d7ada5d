"""RemoteTier: a Valkey server or cluster seen as a tier (TierStore + SerializedStore), for reuse.

Handles are block ids; values are block files, head-sealed (values.py), under keys namespaced by
the model fingerprint. A shared cache, not room: the server may drop any value (maxmemory
eviction, ttl_s, a restart), so the tier never takes a block's only copy (`allocate` is None,
`adopt` is None). It serves `save` and `save_blocks` (write-through with persist, from the
mover's I/O threads) and the reuse calls. A server problem is a miss or a failed save and one
warning: the data path never raises for one. It stores; it never chooses what to keep."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvtier.blocks import BlockMeta, Tier
from kvtier.errors import KVTierError
from kvtier.layout import KVGeometry
from kvtier.machine import default_hash_threads
from kvtier.tiers.base import SerializedEndpoints
from kvtier.tiers.disk.blockio import check_tensors
from kvtier.tiers.disk.format import ReadResult
from kvtier.tiers.remote.client import Parts, RemoteClient
from kvtier.tiers.remote.clients import ThreadClients, try_connect
from kvtier.tiers.remote.encoder import BlockEncoder
from kvtier.tiers.remote.hash_threads import HashThreads, worth_threads
from kvtier.tiers.remote.url import RemoteSpec
from kvtier.tiers.remote.values import (
    Located,
    block_key,
    decode_tensor,
    head_bound,
    heads_end,
    locate,
)

HEADER_CACHE = 4096  # verified block headers kept, so a layer read is one range read
# Checks (hashing and the copy out, which release the GIL) run on these threads: a fetched
# batch is verified while the next one arrives (xxh3-128 10-14 GB/s a core, the copy 2-5; 2-core
# dev box). A big block's layers, a save's or a check's, go on to the hash threads.
CHECK_THREADS = 2
BATCH_BYTES = 8 << 20  # values per MGET: about this many bytes (one value at least)


class RemoteTier(SerializedEndpoints):
    """Blocks of one model and geometry on a Valkey server or cluster; thread-safe.

    Connects at construction: RemoteError (one line) for a wrong password, an unknown host or
    an untrusted certificate; a server that is down then is a warning, and misses until it
    answers. `persist` (remote.persist) tells the controller to write
    every sealed block through; the tier only stores what `save` and `save_blocks` are given.
    """

    tier = Tier.REMOTE
    holds_open_blocks = False  # keyed by content id: sealed blocks only
    limit_bytes = 0  # never a block's only copy: the server may drop any value
    save_writers = 2  # save_blocks calls the mover runs at once: a server takes them on one thread
    # Blocks that cost as much to hash as this many bytes of xxh3-128 hash their layers on the
    # hash threads when saved (hash_threads.worth_threads: signed, sha256, from 1 MiB) ...
    hash_on_threads_bytes = 8 << 20
    # ... or, below this size and more than one to a save_blocks call, are encoded whole there,
    # side by side (a 1 MiB block's 32 layers of 32 KiB are too small to spread: docs/remote.md)
    encode_whole_below_bytes = 8 << 20
    # ... and check them there when loaded: signed from 8 MiB (2-core dev box, docs/remote.md:
    # 1-4 MiB lost, 8 and 32 MiB paid; a batch of smaller blocks already overlaps its fetch).
    check_on_threads_bytes = 64 << 20

    def __init__(
        self,
        spec: RemoteSpec,
        geometry: KVGeometry,
        *,
        fingerprint: str,
        persist: bool = False,
        model_key: str = "",
        client: RemoteClient | None = None,
    ) -> None:
        self.spec = spec
        self.geometry = geometry
        self.fingerprint = fingerprint
        self.persist = persist
        self.model_key = model_key
        self._warned: set[str] = set()
        self._clients = ThreadClients(spec, client or try_connect(spec, self._warned), self._warned)
        self._names = tuple(f"l{layer_id}.kv" for layer_id in geometry.layer_ids)
        labels = {"model_key": model_key, "tokens": geometry.block_tokens}
        labels = {name: value for name, value in labels.items() if value}
        shapes = dict.fromkeys(self._names, self.layer_buffer())
        self._head_bytes = head_bound("0" * 32, shapes, self._key("0" * 32))
        self._headers: OrderedDict[str, Located] = OrderedDict()
        self._lock = threading.Lock()
        self._checks = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="kvtier-remote-check")
        self._hashes = HashThreads(default_hash_threads())
        self._encoder = BlockEncoder(
            fingerprint=fingerprint,
            labels=labels,
            hmac_key=spec.hmac_key,
            shapes=shapes,
            key_of=self._key,
            hashes=self._hashes,
        )
        self._counters = {
            "saved_bytes": 0,
            "loaded_bytes": 0,
            "saves": 0,
            "failed_saves": 0,
            "hits": 0,
            "misses": 0,
            "rejected": 0,
            "save_s": 0.0,
            "load_s": 0.0,
        }

    # -- TierStore: no room of its own --------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return 0

    def capacity_blocks(self, limit_bytes: int | None = None) -> int:
        return 0

    def room_blocks(self) -> int:
        return 0

    def reserve(self, slots: int) -> bool:
        """No room of its own to prepare."""
        return False

    def allocate(self, block: BlockMeta | None = None) -> str | None:
        return None  # the controller keeps every block in a tier that cannot drop it

    def free(self, key: str) -> None:
        """Nothing to release: stored values stay for other processes (ttl_s and the server's
        maxmemory policy bound them)."""

    def set_limit(self, limit_bytes: int) -> list[str]:
        return []

    def reorder_rows(
        self,
        key: str,
        rows: torch.Tensor,
        *,
        old_key: str | None,
        new_key: str | None,
        parent_id: str | None,
    ) -> str:
        """Store the block with its batch rows permuted under its new id (the old value stays:
        other processes may use it)."""
        if new_key is None or new_key == key:
            return key
        layers = [self.layer_buffer() for _ in self._names]
        if not self.load_block(key, layers):
            raise KVTierError(f"remote block {key} is gone from the server; re-run the prompt")
        permuted = tuple(t.index_select(2, rows.to("cpu")) for t in layers)
        self.save(new_key, permuted, parent_id=parent_id)
        return new_key

    def load_bandwidth(self) -> float | None:
        """Measured read bandwidth in bytes per second: raw tensor bytes of the blocks loaded so
        far over the wall time of the load calls that fetched them (misses and rejected values
        included: they cost a round trip and bring nothing); None before the first block loaded.

        What a load-or-recompute choice weighs against the recompute time: loading `n` bytes of
        blocks takes about `n / load_bandwidth()` seconds. Per calling thread: calls from several
        threads at once each count their own wall time. Thread-safe.
        """
        with self._lock:
            loaded, seconds = self._counters["loaded_bytes"], self._counters["load_s"]
        return loaded / seconds if loaded and seconds > 0 else None

    def stats(self) -> dict[str, object]:
        """Counters since build; `load_gbps` is `load_bandwidth()` in 1e9 bytes/s (None before
        any block loaded)."""
        with self._lock:
            figures: dict[str, object] = dict(self._counters)
        load_s = float(figures["load_s"])
        bandwidth = self.load_bandwidth()
        figures["load_gbps"] = bandwidth / 1e9 if bandwidth else None
        figures["io_s"] = figures["save_s"] + load_s
        figures["errors"] = self._clients.error_counts()
        return figures

    def close(self) -> None:
        """Close every connection, the check and the hash threads; never raises."""
        self._clients.close()
        self._checks.shutdown(wait=True)
        self._hashes.close()

    # -- SerializedStore (the mover's I/O threads; any thread) --------------------------------
    def save(self, key: str, layers: tuple[torch.Tensor, ...], *, parent_id: str | None) -> int:
        """Store every layer of block `key` (contiguous CPU tensors by tiered index): the bytes
        sent, or 0 when the server did not take it; `save_blocks` of one block."""
        return self.save_blocks([key], [layers], parent_ids=[parent_id])[0]

    def save_blocks(
        self,
        keys: Sequence[str],
        layers: Sequence[Sequence[torch.Tensor]],
        *,
        parent_ids: Sequence[str | None],
    ) -> list[int]:
        """save for many blocks in one pipeline: each value is encoded when the client asks for
        it, or ahead on the hash threads (a batch of small signed blocks: BlockEncoder), so the
        server takes in one while the next is encoded; every reply read after the last.
        Per block the bytes sent, or 0 when the server did not acknowledge it (down, slow, full:
        warned once per cause; a miss later). Never raises for a server problem; KVTierError,
        before anything is sent, for blocks that do not fit."""
        started = time.perf_counter()
        if not len(keys) == len(layers) == len(parent_ids):
            raise KVTierError("save_blocks needs one block of layers and one parent id per key")
        if any(len(block) != len(self._names) for block in layers):
            raise KVTierError(f"save needs {len(self._names)} layer tensors per block")
        blocks = [dict(zip(self._names, block, strict=True)) for block in layers]
        for key, tensors in zip(keys, blocks, strict=True):
            check_tensors(key, tensors)
        encoded = self._encoder.values(  # closed below: no hash thread reads a tensor after
            list(zip(keys, blocks, parent_ids, strict=True)),
            block_bytes=self.geometry.block_bytes,
            threads_from_bytes=self.hash_on_threads_bytes,
            whole_below_bytes=self.encode_whole_below_bytes,
        )
        sizes: list[int] = []  # of each value sent, in order

        def values() -> Iterator[Parts]:  # the layers' own memory, sent before this returns
            for value in encoded:
                sizes.append(value.nbytes)
                yield value

        client = self._clients.get() if keys else None
        with contextlib.closing(encoded):
            stored = client.put_each([self._key(k) for k in keys], values()) if client else []
        sent = [size if ok else 0 for size, ok in zip(sizes, stored, strict=False)]
        sent += [0] * (len(keys) - len(sent))  # not encoded: the server had failed meanwhile
        with self._lock:
            self._counters["saves"] += sum(stored)
            self._counters["failed_saves"] += len(keys) - sum(stored)
            self._counters["saved_bytes"] += sum(sent)
            self._counters["save_s"] += time.perf_counter() - started
        return sent

    def load_into(self, key: str, tiered_index: int, out: torch.Tensor) -> ReadResult:
        """Tiered layer `tiered_index` of block `key` into `out` (a contiguous CPU tensor):
        one range read once the block's header is known (else two). Falsy when it cannot."""
        started = time.perf_counter()
        name = self._names[tiered_index]
        located = self._located(key)
        result = located if isinstance(located, ReadResult) else ReadResult.OK
        if isinstance(located, Located):
            start, end = located.span(name)
            result = self._read_range(key, located, name, start, end, out)
        self._count_many([result], [out.nbytes], started)
        return result

    def _read_range(
        self, key: str, located: Located, name: str, start: int, end: int, out: torch.Tensor
    ) -> ReadResult:
        client = self._clients.get()
        found = client.get_range_many([self._key(key)], start, end - 1) if client else [None]
        payload = found[0]
        if payload is None or len(payload) != end - start:
            self._forget(key)  # gone, or replaced by a value of another length
            return ReadResult.MISSING
        if not decode_tensor(self._key(key), located, name, payload, out, warned=self._warned):
            self._forget(key)
            return ReadResult.CORRUPT
        return ReadResult.OK

    # -- reuse: blocks any process stored ------------------------------------------------------
    def contains(self, key: str) -> bool:
        return self.stored_prefix([key]) == 1

    def probe(self, key: str) -> ReadResult:
        """Whether block `key` is stored with valid heads (one range read of its first bytes;
        the tensors' checksums are checked when it is loaded)."""
        located = self._located(key, refresh=True)
        return located if isinstance(located, ReadResult) else ReadResult.OK

    def stored_prefix(self, keys: Sequence[str]) -> int:
        """How many of `keys` (a chain of block ids, first to last) have a value on the server,
        from the first: one pipelined STRLEN per key, one round trip per node. A value that then
        fails its checks is a failed load: stop the reuse there."""
        client = self._clients.get()
        if client is None or not keys:
            return 0
        for count, length in enumerate(client.length_many([self._key(k) for k in keys])):
            if not length:
                return count
        return len(keys)

    def load_block(self, key: str, layers: Sequence[torch.Tensor]) -> ReadResult:
        """Every tiered layer of block `key` into `layers[tiered_index]` (contiguous CPU tensors
        of `[block_tokens, 2, batch, kv_heads, head_dim]` elements; pinned is fine): one GET.
        Falsy when missing or failing a check: recompute then."""
        return self.load_blocks([key], [layers])[0]

    def load_blocks(
        self, keys: Sequence[str], layers: Sequence[Sequence[torch.Tensor]]
    ) -> list[ReadResult]:
        """load_block for many blocks, fetched in MGETs of about BATCH_BYTES, pipelined
        (`RemoteClient.get_batches`: the next one already asked for); a batch is verified on a
        check thread while the next one is fetched."""
        if any(len(per_block) != len(self._names) for per_block in layers):
            raise KVTierError(f"load_block needs {len(self._names)} layer tensors per block")
        started = time.perf_counter()
        client = self._clients.get()
        per_batch = max(1, BATCH_BYTES // max(1, self.geometry.block_bytes))
        batches = [range(i, min(i + per_batch, len(keys))) for i in range(0, len(keys), per_batch)]
        server_keys = [[self._key(keys[i]) for i in batch] for batch in batches]
        fetched = client.get_batches(server_keys) if client else ([None] * len(b) for b in batches)
        results: list[ReadResult] = []
        checking: Future[list[ReadResult]] | None = None  # the previous batch's checks
        with contextlib.closing(fetched):  # the connection goes back even if a check raises
            for batch, values in zip(batches, fetched, strict=True):
                if checking is not None:
                    results.extend(checking.result())
                blocks = [(keys[i], v, layers[i]) for i, v in zip(batch, values, strict=True)]
                if batch.stop == len(keys):  # the last batch: no later one to overlap checks with
                    checking = None
                    results.extend(self._decode_blocks(blocks))
                else:
                    checking = self._submit_check(blocks)
        self._count_many(results, [sum(t.nbytes for t in outs) for outs in layers], started)
        if self.spec.ttl_s and client is not None:
            hits = [self._key(k) for k, r in zip(keys, results, strict=True) if r]
            client.expire_many(hits, self.spec.ttl_s)  # a reused prefix stays while it is used
        return results

    def _submit_check(
        self, blocks: list[tuple[str, bytes | bytearray | None, Sequence[torch.Tensor]]]
    ) -> Future[list[ReadResult]]:
        """Decode and check `blocks` on a check thread; in this thread after close()."""
        try:
            return self._checks.submit(self._decode_blocks, blocks)
        except RuntimeError:  # shut down by close(): a late load still works, unoverlapped
            done: Future[list[ReadResult]] = Future()
            done.set_result(self._decode_blocks(blocks))
            return done

    def _decode_blocks(
        self, blocks: Sequence[tuple[str, bytes | bytearray | None, Sequence[torch.Tensor]]]
    ) -> list[ReadResult]:
        return [self._decode_block(key, value, outs) for key, value, outs in blocks]

    def _decode_block(
        self, key: str, value: bytes | bytearray | None, outs: Sequence[torch.Tensor]
    ) -> ReadResult:
        if not value:
            return ReadResult.MISSING
        located = self._locate(key, value, len(value))
        if located is None:
            return ReadResult.CORRUPT
        view, server_key, warned = memoryview(value), self._key(key), self._warned

        def check(layer: tuple[str, torch.Tensor]) -> bool:  # copy out one layer, check its bytes
            (name, out), (start, end) = layer, located.span(layer[0])
            return decode_tensor(server_key, located, name, view[start:end], out, warned=warned)

        layers = zip(self._names, outs, strict=True)
        threshold = self.check_on_threads_bytes
        if worth_threads(located.header.algorithm, self.geometry.block_bytes, threshold):
            intact = all(self._hashes.map(check, layers))  # every layer checked, then the verdict
        else:
            intact = all(map(check, layers))  # stops at the first bad layer
        if not intact:
            self._forget(key)
            return ReadResult.CORRUPT
        return ReadResult.OK

    def adopt(self, key: str) -> str | None:
        """None: the tier holds no block as the controller's copy (the server may drop it);
        load it into host with `load_block` instead."""
        return None

    def publish(self, key: str) -> bool:
        """True if block `key` is on the server: every stored value is shared already."""
        return self.contains(key)

    # -- helpers -------------------------------------------------------------------------------
    def _key(self, block_id: str) -> str:
        return block_key(self.fingerprint, block_id)

    def _located(self, key: str, *, refresh: bool = False) -> Located | ReadResult:
        """The block's verified header: cached, or from one range read of the value's start."""
        with self._lock:
            located = None if refresh else self._headers.get(key)
            if located is not None:
                self._headers.move_to_end(key)
                return located
        client = self._clients.get()
        found = client.prefix_many([self._key(key)], self._head_bytes) if client else [None]
        if found[0] is None or not found[0][1]:
            self._forget(key)
            return ReadResult.MISSING
        prefix, value_bytes = found[0]
        need = heads_end(prefix)
        if need is not None and len(prefix) < need <= value_bytes and client is not None:
            longer = client.prefix_many([self._key(key)], need)[0]  # heads past the bound
            prefix = longer[0] if longer else prefix
        located = self._locate(key, prefix, value_bytes)
        return ReadResult.CORRUPT if located is None else located

    def _locate(self, key: str, prefix: bytes, value_bytes: int) -> Located | None:
        located = locate(
            self._key(key),
            key,
            prefix,
            value_bytes=value_bytes,
            fingerprint=self.fingerprint,
            hmac_key=self.spec.hmac_key,
            warned=self._warned,
        )
        with self._lock:
            if located is None:
                self._headers.pop(key, None)
                return None
            self._headers[key] = located
            self._headers.move_to_end(key)
            while len(self._headers) > HEADER_CACHE:
                self._headers.popitem(last=False)
        return located

    def _forget(self, key: str) -> None:
        with self._lock:
            self._headers.pop(key, None)

    def _count_many(
        self, results: Sequence[ReadResult], sizes: Sequence[int], started: float
    ) -> None:
        """Count one load call: its results, the bytes of its hits, its wall time since `started`."""
        elapsed = time.perf_counter() - started
        with self._lock:
            for result, nbytes in zip(results, sizes, strict=True):
                outcome = {ReadResult.OK: "hits", ReadResult.MISSING: "misses"}.get(
                    result, "rejected"
                )
                self._counters[outcome] += 1
                self._counters["loaded_bytes"] += nbytes if result else 0
            self._counters["load_s"] += elapsed
