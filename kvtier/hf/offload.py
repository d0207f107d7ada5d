"""kvtier.offload: every `model.generate()` in a `with` block runs on a fresh TieredCache.

What HF's `cache_implementation="offloaded"` offers, with kvtier's tiers: the block patches the
model's `generate` (on the instance, nowhere else) and restores it on exit, closing the caches it
made that are still alive. A call that brings its own cache, asks for another cache
implementation or turns the cache off runs unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Iterator

import torch

from kvtier.config import Config, load_config
from kvtier.errors import KVTierError
from kvtier.hf.cache import TieredCache
from kvtier.hf.hooks import CACHE_KWARGS, cache_keyword, passed_cache
from kvtier.hf.models import describe


class OffloadHandle:
    """What `with kvtier.offload(model, cfg) as handle` gives: the latest call's cache and stats."""

    def __init__(self, model: torch.nn.Module, config: Config) -> None:
        self.model = model
        self.config = config
        self.calls = 0  # generate() calls that ran on a TieredCache made here
        self._latest: weakref.ref | None = None
        self._latest_stats: dict | None = None
        self._made: weakref.WeakSet[TieredCache] = weakref.WeakSet()

    @property
    def cache(self) -> TieredCache | None:
        """The latest call's TieredCache while something (its output) keeps it alive, else None."""
        return None if self._latest is None else self._latest()

    def stats(self) -> dict:
        """The latest call's `stats()` (docs/stats.md), taken when its generate() returned."""
        if self._latest_stats is None:
            raise KVTierError(
                "no generate() has run inside this kvtier.offload block yet; call "
                "model.generate(...) first"
            )
        return self._latest_stats

    def generate(self, original, *args, **kwargs):
        """One generate() call: on a fresh TieredCache unless it brings or refuses one."""
        if any(kwargs.get(name) is self for name in CACHE_KWARGS):
            raise KVTierError(
                "pass no cache inside kvtier.offload: every generate() gets its own TieredCache "
                "(handle.cache is the latest); or pass a kvtier.TieredCache you made"
            )
        own = passed_cache(kwargs) is not None
        if own or kwargs.get("use_cache") is False or kwargs.get("cache_implementation"):
            return original(*args, **kwargs)
        cache = TieredCache(self.model, self.config)
        self._made.add(cache)
        self._latest = weakref.ref(cache)
        kwargs[cache_keyword(self.model)] = cache
        try:
            return original(*args, **kwargs)
        finally:
            self.calls += 1
            self._latest_stats = cache.stats()

    def close(self) -> None:
        for cache in list(self._made):
            cache.close()


@contextlib.contextmanager
def offload(
    model: torch.nn.Module, config: Config | str | os.PathLike | None = None
) -> Iterator[OffloadHandle]:
    """Run every `model.generate(...)` inside the block on a fresh TieredCache built from
    `config` (as HF's `cache_implementation="offloaded"`, with kvtier's tiers).

    Yields an OffloadHandle: `handle.stats()` is the latest call's stats. A call given its own
    cache (`past_key_values=` or `cache=`, a TieredCache included) uses it. On exit
    `model.generate` is restored and the caches made here that are still alive are closed.
    Blocks may nest (the inner one wins while it is open).
    """
    if not isinstance(config, Config):
        config = load_config(config)  # once for the block, not per call
    describe(model, model_key=config.disk.model_key)  # an unsupported model is refused now
    handle = OffloadHandle(model, config)
    had = "generate" in model.__dict__
    previous = model.__dict__.get("generate")
    original = model.generate
    patched = functools.wraps(original)(functools.partial(handle.generate, original))
    model.generate = patched
    try:
        yield handle
    finally:
        if model.__dict__.get("generate") is patched:
            if had:
                model.generate = previous
            else:
                del model.__dict__["generate"]
        handle.close()
