"""The process's reuse index: live controllers by model fingerprint, hits, prefill speed.

One per process (`INDEX`), like the policy registry: it holds controllers weakly (a closed or
collected cache's blocks are gone, and so are its entries), counts how often each block id was
reused here (`disk.admit_after_hits`), and keeps the prefill FLOP/s measured per model. It
never moves or frees a block; the reuse code reads other controllers' tables through it.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any


class ReuseIndex:
    """Where a new sequence finds blocks other caches of this process hold (GPU, host, disk)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._controllers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._hits: Counter[str] = Counter()
        self._prefill: dict[str, float] = {}  # fingerprint -> the fastest call's FLOP/s
        self._loads: dict[Any, tuple[float, float]] = {}  # tier -> (predicted s, measured s)

    def register(self, controller: Any) -> None:
        """Make `controller`'s sealed blocks findable by other controllers of the same model."""
        with self._lock:
            self._controllers.add(controller)

    def controllers(self, fingerprint: str) -> Iterator[Any]:
        """Live controllers of the model with this fingerprint (a snapshot)."""
        with self._lock:
            found = [c for c in self._controllers if c.fingerprint == fingerprint]
        yield from found

    def hit(self, block_id: str) -> int:
        """Count one reuse of `block_id`; the count so far."""
        with self._lock:
            self._hits[block_id] += 1
            return self._hits[block_id]

    def hits(self, block_id: str) -> int:
        with self._lock:
            return self._hits[block_id]

    def record_prefill(self, fingerprint: str, flops: float, seconds: float) -> float | None:
        """One measured prefill call: `flops` (costs.PrefillFlops) computed in `seconds`; its
        FLOP/s if it is this process's fastest for the model so far, else None."""
        if flops <= 0 or seconds <= 0:
            return None
        with self._lock:
            if flops / seconds <= self._prefill.get(fingerprint, 0.0):
                return None
            self._prefill[fingerprint] = flops / seconds
            return flops / seconds

    def prefill_flops(self, fingerprint: str) -> float | None:
        """The FLOP/s of this model's fastest prefill call in this process, or None: a process's
        first calls pay kernel set-up and pinning (on the H200, a total over every call put a
        32K recompute at 5.5 s; it took 1.6 s), and recomputing runs at the steady speed."""
        with self._lock:
            return self._prefill.get(fingerprint)

    def record_load(self, tier: Any, predicted_s: float, measured_s: float) -> None:
        """One prefix load mostly from `tier`: what the cost model predicted, what it took."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        with self._lock:
            predicted, measured = self._loads.get(tier, (0.0, 0.0))
            self._loads[tier] = (predicted + predicted_s, measured + measured_s)

    def load_scale(self) -> dict[Any, float]:
        """Per tier: measured over predicted seconds of this process's prefix loads."""
        with self._lock:
            return {tier: spent / guess for tier, (guess, spent) in self._loads.items()}

    def clear(self) -> None:
        """Forget hits and measured speeds (tests)."""
        with self._lock:
            self._hits.clear()
            self._prefill.clear()
            self._loads.clear()


INDEX = ReuseIndex()
