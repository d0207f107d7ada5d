"""Placement policies behind one small interface (`Policy`), built by name from the registry.

A policy decides which blocks stay in a faster tier; it never touches a tensor or a slot.
"""

from __future__ import annotations

from kvtier.config import PolicyConfig
from kvtier.policy.base import Policy
from kvtier.policy.lfu import LFUPolicy
from kvtier.policy.sink_recent import SinkRecentPolicy
from kvtier.registry import (
    import_policy_module,
    policy_factory,
    register_policy,
    registered_policies,
)

__all__ = [
    "LFUPolicy",
    "Policy",
    "SinkRecentPolicy",
    "make_policy",
    "register_policy",
    "registered_policies",
]


def make_policy(cfg: PolicyConfig, block_tokens: int) -> Policy:
    """The policy `cfg.name` names, built for blocks of `block_tokens` positions.

    `cfg.module` is imported first (a no-op once imported), so a config resolved elsewhere
    builds its user policy in this process too.
    """
    if cfg.module:
        import_policy_module(cfg.module)
    return policy_factory(cfg.name)(cfg, block_tokens)
