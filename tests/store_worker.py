"""A fork server for the store's process tests: real processes in milliseconds, no pickle.

`python tests/store_worker.py` imports kvtier's disk store once, then reads one JSON command
per line on stdin: {"spawn": job} forks a child that runs `job` (a dict, see JOBS) and answers
{"pid": n}; {"wait": pid} answers {"pid": pid, "code": exit code or -signal}. Children exit
with os._exit: 0 if the job held, 1 if it found a wrong result, 3 on an exception.
The server has run no torch op before it forks (only imports), so children start clean.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

from kvtier.errors import BudgetError
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.disk.format import ReadResult

BLOCK_SHAPE = (64, 2, 1, 4, 32)  # 64 KiB of fp32 per tensor: a write takes a while to finish


def tensors_of(block_id: str, layers: int = 2) -> dict[str, torch.Tensor]:
    """The one content a block id stands for, in every process (equal ids, equal data)."""
    generator = torch.Generator().manual_seed(int(block_id[:12], 16))
    return {f"l{i}.kv": torch.randn(BLOCK_SHAPE, generator=generator) for i in range(layers)}


def block_ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{index:04x}".ljust(32, "0") for index in range(count)]


def _store(job: dict) -> DiskStore:
    codec = job.get("codec", "raw")
    return DiskStore(
        job["root"], budget_bytes=job["budget_bytes"], codec=codec, fingerprint="fp-processes"
    )


def _die_at(name: str, after: int) -> None:
    """SIGKILL this process on call `after` of os.<name> (a crash point chosen exactly)."""
    real = getattr(os, name)
    calls = [0]

    def deadly(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] > after:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, name, deadly)


def write_forever(job: dict) -> int:
    """Write (persist or not), delete and read blocks of a small id pool until killed; 1 if a
    read ever returns other bytes than the id stands for."""
    if job.get("die_at"):
        _die_at(job["die_at"], job.get("after", 0))
    rng = random.Random(job["seed"])
    pool = block_ids("a1", 12)
    store = _store(job)
    for _ in range(job.get("steps", 10_000)):
        block_id = rng.choice(pool)
        try:
            store.write_block(
                block_id, tensors_of(block_id), parent_id=None, persist=rng.random() < 0.5
            )
        except BudgetError:  # the other writers' blocks fill the store: fine here
            pass
        if rng.random() < 0.3:
            store.delete(rng.choice(pool))
        block_id = rng.choice(pool)
        read = store.read_block(block_id)
        if read is not None and not _exact(read, tensors_of(block_id)):
            return 1
    store.close()
    return 0


def share_and_read(job: dict) -> int:
    """Write `mine` (persist or not), read every one back exactly, read the others' ids
    (OK or MISSING, never CORRUPT), close at `close_after_s`; record results in `out`."""
    store = _store(job)
    seen = {"ok": 0, "missing": 0, "corrupt": 0, "wrong": 0}
    for block_id in job["mine"]:
        store.write_block(block_id, tensors_of(block_id), parent_id=None, persist=job["persist"])
    deadline = time.monotonic() + job["read_s"]
    while time.monotonic() < deadline:
        for block_id in job["mine"] + job["others"]:
            outs = {name: torch.empty(BLOCK_SHAPE) for name in ("l0.kv", "l1.kv")}
            result = store.read_into(block_id, outs)
            seen[result.value] += 1
            if result is ReadResult.OK and not _exact(outs, tensors_of(block_id)):
                seen["wrong"] += 1
            if block_id in job["mine"] and result is not ReadResult.OK:
                seen["wrong"] += 1  # our own blocks never go missing while we hold them
    store.close()
    Path(job["out"]).write_text(json.dumps(seen))
    return 0 if seen["wrong"] == seen["corrupt"] == 0 else 1


def collect_loop(job: dict) -> int:
    """Collect the whole store down to `max_bytes` again and again for `seconds`."""
    from kvtier.tiers.disk.areas import StoreLayout
    from kvtier.tiers.disk.ledger import collect

    deadline = time.monotonic() + job["seconds"]
    while time.monotonic() < deadline:
        collect(StoreLayout(Path(job["root"])), max_bytes=job["max_bytes"])
        time.sleep(0.01)
    return 0


def _exact(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(left[name], right[name]) for name in right)


JOBS = {"write_forever": write_forever, "share_and_read": share_and_read, "collect": collect_loop}


def _child(job: dict) -> None:
    code = 3
    try:
        code = JOBS[job["kind"]](job)
    except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
        traceback.print_exc()
    finally:
        os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        command = json.loads(line)
        if "spawn" in command:
            pid = os.fork()
            if pid == 0:
                _child(command["spawn"])
            reply = {"pid": pid}
        else:
            _, status = os.waitpid(command["wait"], 0)
            reply = {"pid": command["wait"], "code": os.waitstatus_to_exitcode(status)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
