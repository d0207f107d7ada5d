"""Mover.submit_saves against a store that limits its concurrent save_blocks calls: the batches
run at most `save_writers` at a time, in order, every block settles, and the I/O threads stay
free for other work meanwhile."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvtier import transfer
from kvtier.errors import NotStored
from kvtier.tiers.base import Stored
from kvtier.transfer import Mover


class SlowStore:
    """save_blocks that takes a while and records how many calls overlap (a server's writers)."""

    save_writers = 2

    def __init__(self, refuse: set[str] = frozenset()) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.calls: list[list[str]] = []
        self.refuse = refuse

    def save_blocks(self, keys, layers, *, parent_ids):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(list(keys))
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        return [
            0 if key in self.refuse else sum(t.nbytes for t in block)
            for key, block in zip(keys, layers, strict=True)
        ]


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(transfer, "SAVE_BATCH_BYTES", 1024)  # two blocks a call below


def _blocks(count: int) -> list[tuple[torch.Tensor, ...]]:
    return [(torch.full((64,), float(i)), torch.full((64,), -float(i))) for i in range(count)]


def test_saves_run_at_most_the_stores_writers_at_once(small_batches):
    """Scenario: twelve blocks, six save_blocks calls on an 8-thread mover: never more than two
    at once, the calls in submission order, every ticket settled with its bytes; a disk-like
    read submitted meanwhile is not stuck behind the queued saves."""
    store, mover = SlowStore(), Mover(workers=8)
    try:
        blocks = _blocks(12)
        tickets = mover.submit_saves([(b, Stored(store, f"k{i}")) for i, b in enumerate(blocks)])
        other = mover.pool.submit(lambda: "read")  # an I/O thread is free for it at once
        assert other.result(timeout=0.5) == "read"
        for ticket in tickets:
            mover.finish(ticket)
        assert store.most == 2
        assert [key for call in store.calls for key in call] == [f"k{i}" for i in range(12)]
        assert all(ticket.saves[0].result() == 512 for ticket in tickets)
        assert not mover._saves._waiting and not mover._saves._running  # emptied, dropped
    finally:
        mover.close()


def test_a_refused_block_fails_only_its_own_ticket(small_batches):
    """Scenario: the store takes every block but one: that ticket raises NotStored, the others
    settle, and later saves to the store still run (the queue is not left stuck)."""
    store, mover = SlowStore(refuse={"k3"}), Mover(workers=4)
    try:
        copies = [(b, Stored(store, f"k{i}")) for i, b in enumerate(_blocks(6))]
        tickets = mover.submit_saves(copies)
        with pytest.raises(NotStored):
            mover.finish(tickets[3])
        for i, ticket in enumerate(tickets):
            if i != 3:
                mover.finish(ticket)
        again = mover.submit_saves(copies[:2])
        for ticket in again:
            mover.finish(ticket)
        assert len(store.calls) == 4
    finally:
        mover.close()
