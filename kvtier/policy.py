"""Placement policies behind one small interface, and the registry that names them.

A policy decides which blocks stay in a faster tier; it never touches a tensor or a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .blocks import BlockMeta
    from .config import PolicyConfig


class Policy:
    """Base policy: least recently used, ties broken by position (older positions go first).

    Contract: `pinned` blocks never leave the GPU tier; `victims` orders unpinned candidates,
    first to be demoted first, and returns at most `count` of them.
    """

    name = "lru"

    def __init__(self, cfg: PolicyConfig, block_tokens: int) -> None:
        self.cfg = cfg
        self.block_tokens = block_tokens

    def pinned(self, block: BlockMeta, seq_tokens: int) -> bool:
        return block.pins > 0

    def sort_key(self, block: BlockMeta) -> tuple:
        return (block.last_access, block.index)

    def victims(
        self, candidates: Sequence[BlockMeta], count: int, seq_tokens: int
    ) -> list[BlockMeta]:
        free = [b for b in candidates if not self.pinned(b, seq_tokens)]
        return sorted(free, key=self.sort_key)[:count]


class LFUPolicy(Policy):
    """Least frequently used; ties by recency, then position."""

    name = "lfu"

    def sort_key(self, block: BlockMeta) -> tuple:
        return (block.access_count, block.last_access, block.index)


class SinkRecentPolicy(Policy):
    """Attention sinks (first `sink_tokens`) and the last `recent_tokens` never leave the GPU.

    The rest is LRU. With full attention every block is read every step, so this keeps the
    positions attention weighs most on the GPU and streams the middle.
    """

    name = "sink_recent"

    def pinned(self, block: BlockMeta, seq_tokens: int) -> bool:
        start = block.index * self.block_tokens
        end = start + self.block_tokens
        in_sink = start < self.cfg.sink_tokens
        in_recent = end > seq_tokens - self.cfg.recent_tokens
        return block.pins > 0 or in_sink or in_recent


PolicyFactory = Callable[["PolicyConfig", int], Policy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy selectable as `[policy] name = "<name>"`.

    The class is called as `cls(policy_config, block_tokens)` and should subclass `Policy`.
    Register before `kvtier.load_config` so the config validates the name.
    """
    if not name or not isinstance(name, str):
        raise ConfigError(f"policy name {name!r} must be a non-empty string")

    def decorate(factory: PolicyFactory) -> PolicyFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def registered_policies() -> list[str]:
    return sorted(_REGISTRY)


def make_policy(cfg: PolicyConfig, block_tokens: int) -> Policy:
    try:
        factory = _REGISTRY[cfg.name]
    except KeyError:
        raise ConfigError(
            f"policy.name = {cfg.name!r} is not a registered policy; use one of "
            f"{', '.join(registered_policies())} or register yours with "
            "kvtier.register_policy(name) before load_config"
        ) from None
    return factory(cfg, block_tokens)


register_policy("lru")(Policy)
register_policy("lfu")(LFUPolicy)
register_policy("sink_recent")(SinkRecentPolicy)
