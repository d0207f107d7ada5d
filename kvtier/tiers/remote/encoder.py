"""BlockEncoder: a save's values, encoded in order as the client takes them, each block's
checksums scheduled by what they cost (in series, a big block's layers on the hash threads, or a
batch's small blocks whole, side by side). It encodes only: it never sends, and the bytes do not
depend on the schedule."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from kvtier.tiers.disk.format import HeaderTemplate
from kvtier.tiers.remote.client import Parts
from kvtier.tiers.remote.hash_threads import HashThreads, worth_threads
from kvtier.tiers.remote.values import encode_value, signed_checksum

Block = tuple[str, Mapping[str, torch.Tensor], "str | None"]  # (block id, tensors, parent id)


class BlockEncoder:
    """The values of one model's blocks (`encode_value` with the tier's fingerprint, labels, key
    and header template); thread-safe. `key_of` turns a block id into its server key."""

    def __init__(
        self,
        *,
        fingerprint: str,
        labels: Mapping[str, object],
        hmac_key: bytes | None,
        shapes: Mapping[str, torch.Tensor],
        key_of: Callable[[str], str],
        hashes: HashThreads,
    ) -> None:
        self.algorithm = signed_checksum(hmac_key)
        self._key_of = key_of
        self._hashes = hashes
        self._encode = functools.partial(  # (server key, block id, tensors, *, parent_id, ...)
            encode_value,
            fingerprint=fingerprint,
            labels=labels,
            hmac_key=hmac_key,
            template=HeaderTemplate(fingerprint, shapes, labels=labels, algorithm=self.algorithm),
        )

    def values(
        self,
        blocks: Sequence[Block],
        *,
        block_bytes: int,
        threads_from_bytes: int,
        whole_below_bytes: int,
    ) -> Iterator[Parts]:
        """Each block's value, in order, encoded as it is taken (the tensors' own memory: send
        it before they change). Blocks that cost `threads_from_bytes` of xxh3-128 to hash
        (`worth_threads`) use the hash threads: below `whole_below_bytes`, and more than one,
        whole blocks side by side, at most two a thread encoded ahead of the one taken (that
        bounds the values that wait); else one block's layers at a time. Close the iterator
        when not run to the end: then no thread still reads a tensor. An encode's exception is
        raised when its value is taken, after the blocks ahead of it are done."""
        on_threads = worth_threads(self.algorithm, block_bytes, threads_from_bytes)
        whole = on_threads and len(blocks) > 1 and block_bytes < whole_below_bytes
        hash_map = self._hashes.map if on_threads and not whole else map
        encode = functools.partial(self._encode_block, hash_map=hash_map)
        if whole:
            return self._hashes.map_ahead(encode, blocks, window=2 * self._hashes.threads)
        return (encode(block) for block in blocks)

    def _encode_block(self, block: Block, *, hash_map: Callable[..., object]) -> Parts:
        block_id, tensors, parent_id = block
        key = self._key_of(block_id)
        return Parts(self._encode(key, block_id, tensors, parent_id=parent_id, hash_map=hash_map))
