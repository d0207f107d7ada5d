"""The Policy contract every placement policy implements; the base itself is `lru`.

A policy ranks blocks and says which are pinned to the GPU; it never touches a tensor or a slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from kvtier.blocks import BlockMeta
from kvtier.config import PolicyConfig
from kvtier.errors import ConfigError


class Policy:
    """Base policy: least recently used, ties broken by position (older positions go first).

    Contract: `pinned` blocks never leave the GPU tier; `victims` orders unpinned candidates,
    first to be demoted first, and returns at most `count` of them; `max_pinned_blocks` bounds
    how many blocks `pinned` can hold at once (what a GPU budget planned for the policy leaves
    room for; the controller's minimum is staging plus one slot).

    `settings` on a subclass declares its own settings, name -> default (an int, float, bool or
    str; the default's type is the setting's type); a `[policy.<name>]` table sets them and
    load_config refuses unknown keys. On an instance, `self.settings` holds the resolved values.
    """

    name = "lru"
    settings: Mapping[str, object] = MappingProxyType({})

    def __init__(self, cfg: PolicyConfig, block_tokens: int) -> None:
        self.cfg = cfg
        self.block_tokens = block_tokens
        declared = type(self).settings
        unknown = sorted(set(cfg.settings) - set(declared))
        if unknown:  # load_config checks this too; a hand-built PolicyConfig may not have
            raise ConfigError(
                f"policy {cfg.name!r} has no settings {unknown}; it declares: "
                f"{', '.join(declared) or 'none'}"
            )
        self.settings = MappingProxyType({**declared, **cfg.settings})

    def pinned(self, block: BlockMeta, seq_tokens: int) -> bool:
        return block.pins > 0

    def max_pinned_blocks(self) -> int:
        """Blocks this policy pins by position at most (explicit `pins` are the caller's)."""
        return 0

    def sort_key(self, block: BlockMeta) -> tuple:
        return (block.last_access, block.index)

    def victims(
        self, candidates: Sequence[BlockMeta], count: int, seq_tokens: int
    ) -> list[BlockMeta]:
        free = [b for b in candidates if not self.pinned(b, seq_tokens)]
        return sorted(free, key=self.sort_key)[:count]
