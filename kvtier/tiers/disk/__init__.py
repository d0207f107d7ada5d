"""The disk tier: block files (format.py), their file mechanics (files.py), the store with its
budget and verified reads (store.py), and the store seen as a tier (tier.py)."""

from __future__ import annotations

from kvtier.tiers.disk.store import DiskStore
from kvtier.tiers.disk.tier import DiskTier

__all__ = ["DiskStore", "DiskTier"]
