"""The tier controller: the step cycle and edits (controller.py), where blocks live
(placement.py), gather planning (gather.py), copies in flight (writes.py) and counters (stats.py).

Internal: users reach it through kvtier.TieredCache.
"""

from __future__ import annotations

from kvtier.controller.controller import TierController
from kvtier.tiers import check_servers

__all__ = ["TierController", "check_servers"]
