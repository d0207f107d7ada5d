"""How fast host RAM can be pinned on this machine, and how fast it then copies to the GPU.

A device probe (issue 8, target 3): the host tier registers its slabs with cudaHostRegister,
~0.43 s per GiB on the lent H200 (stalling the GPU's other calls). Per GiB, best of --repeats:

  register         torch.empty + cudaHostRegister (what kvtier does)
  touched          the same after the pages were touched (page faults paid before)
  host_alloc       torch.empty(pin_memory=True): cudaHostAlloc through PyTorch's allocator
  hugepages        an anonymous mmap advised MADV_HUGEPAGE, touched, then registered

    python scripts/probe_pinning.py --gib 1 --out $OUT/pinning.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import time
from pathlib import Path

import torch

GiB = 1 << 30


def _register(tensor: torch.Tensor) -> float:
    started = time.perf_counter()
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.nbytes, 0)
    elapsed = time.perf_counter() - started
    assert int(err) == 0, err
    return elapsed


def _h2d_gbps(host: torch.Tensor) -> float:
    device = torch.empty(host.nbytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        device.copy_(host.view(torch.uint8).view(-1), non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return host.nbytes / best / 1e9


def variant(name: str, nbytes: int) -> dict:
    """Seconds per GiB to allocate and touch (touch_s) and to pin (pin_s), then H2D GB/s."""
    keep = None
    started = time.perf_counter()
    if name == "host_alloc":
        tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        touch_s, pin_s = 0.0, time.perf_counter() - started
    else:
        if name == "hugepages":
            keep = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            keep.madvise(mmap.MADV_HUGEPAGE)
            tensor = torch.frombuffer(keep, dtype=torch.uint8)
        else:
            tensor = torch.empty(nbytes, dtype=torch.uint8)
        if name != "register":
            tensor.fill_(1)
        touch_s = time.perf_counter() - started
        pin_s = _register(tensor)
    scale = GiB / nbytes
    row = {"variant": name, "touch_s_per_gib": touch_s * scale, "pin_s_per_gib": pin_s * scale}
    row["h2d_gbps"] = _h2d_gbps(tensor)
    if name != "host_alloc":
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
    del tensor, keep
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    result = {"thp": thp.read_text().strip() if thp.exists() else None, "rows": []}
    nbytes = int(args.gib * GiB)
    for _ in range(args.repeats):
        for name in ("register", "touched", "host_alloc", "hugepages"):
            try:
                row = variant(name, nbytes)
            except Exception as err:  # a probe: report what failed and go on
                row = {"variant": name, "error": repr(err)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    print("transparent hugepages:", result["thp"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
