"""Tensor copies prepared for the mover: merged where they continue one another, sorted once.

The mover splits a whole-block copy into one copy per layer; for blocks in consecutive slots
on both sides, those are contiguous tensors each starting where the previous one ended, which
one larger copy moves at a fraction of the launch cost (`coalesce`). Copies submitted again and
again (a gather's, every decode step) are sorted by device and direction once (`sort_copies`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Pair = tuple[torch.Tensor, torch.Tensor]


def coalesce(copies: list[Pair]) -> list[Pair]:
    """Merge copies that continue one another on both sides into one copy each.

    Whole blocks are copied layer by layer (`_per_layer`); blocks in consecutive slots of a slab
    on both sides (a landing prefix, a promoted run) then make, per layer, copies of contiguous
    tensors each starting where the last one ended. One copy moves such a run: a 32K prefix of
    an 8B model is 32 copies a run instead of 3,680. Copies in one submission never overlap, so
    their order does not matter. Each run's view is made once, at the end.
    """
    runs: list[list] = []  # [first source, first destination, rows], rows None: not mergeable
    ends: dict[tuple[int, int], int] = {}  # (source end, destination end) -> index in runs
    for src, dst in copies:
        index = ends.pop((src.data_ptr(), dst.data_ptr()), None)
        if index is not None and _continues(runs[index], src, dst):
            runs[index][2] += src.shape[0]
        elif src.dim() > 0 and src.shape[0] > 0 and src.is_contiguous() and dst.is_contiguous():
            index = len(runs)
            runs.append([src, dst, src.shape[0]])
        else:
            runs.append([src, dst, None])
            continue
        first_src, first_dst, rows = runs[index]
        ends[(_end(first_src, rows), _end(first_dst, rows))] = index
    return [
        (src, dst)
        if rows is None or rows == src.shape[0]
        else (_grown(src, rows), _grown(dst, rows))
        for src, dst, rows in runs
    ]


def _end(first: torch.Tensor, rows: int) -> int:
    """The address right after `rows` rows of a contiguous tensor starting at `first`'s."""
    return first.data_ptr() + rows * (first.nbytes // first.shape[0])


def _continues(run: list, src: torch.Tensor, dst: torch.Tensor) -> bool:
    """Whether (src, dst) extend `run` (which ends where they start) as one tensor each."""
    return all(
        new.is_contiguous()
        and new.dtype == old.dtype
        and new.shape[1:] == old.shape[1:]
        and new.untyped_storage().data_ptr() == old.untyped_storage().data_ptr()
        for old, new in zip(run[:2], (src, dst), strict=True)
    )


def _grown(first: torch.Tensor, rows: int) -> torch.Tensor:
    """`rows` rows from `first`'s start in its storage, as one row-major view."""
    size = (rows, *first.shape[1:])
    strides, step = [], 1
    for extent in reversed(size):  # row-major: a size-1 dim's stride may be anything in `first`
        strides.append(step)
        step *= extent
    return first.as_strided(size, tuple(reversed(strides)), first.storage_offset())


@dataclass(frozen=True, slots=True)
class Sorted:
    """Tensor copies sorted once for the mover (`sort_copies`), submitted as often as needed:
    a gather's whole-block runs, every step, skip the per-copy sorting and counting.

    `by_device`: the copies by the CUDA device they run on (None: CPU to CPU), in order;
    `on_device` / `off_device` split each device's list by whether the source lies on a GPU
    too (a resident block) or in host memory. Bytes by direction, as the mover counts them.
    """

    by_device: dict[torch.device | None, list[Pair]]
    on_device: dict[torch.device | None, list[Pair]]
    off_device: dict[torch.device | None, list[Pair]]
    count: int
    h2d_bytes: int
    d2h_bytes: int
    d2d_bytes: int

    def plus(self, copy: Pair) -> Sorted:
        """These copies and one more (a gather's open block: its copy changes every step)."""
        one = sort_copies([copy])
        (device,) = one.by_device

        def joined(mine: dict, theirs: dict) -> dict:
            out = dict(mine)
            if device in theirs:
                out[device] = [*mine.get(device, ()), *theirs[device]]
            return out

        return Sorted(
            joined(self.by_device, one.by_device),
            joined(self.on_device, one.on_device),
            joined(self.off_device, one.off_device),
            self.count + 1,
            self.h2d_bytes + one.h2d_bytes,
            self.d2h_bytes + one.d2h_bytes,
            self.d2d_bytes + one.d2d_bytes,
        )


def sort_copies(copies: list[Pair]) -> Sorted:
    """Sort tensor copies for the mover: see `Sorted`."""
    by_device: dict[torch.device | None, list[Pair]] = {}
    on_device: dict[torch.device | None, list[Pair]] = {}
    off_device: dict[torch.device | None, list[Pair]] = {}
    moved = {"h2d": 0, "d2h": 0, "d2d": 0}
    for src, dst in copies:
        device = cuda_device(src, dst)
        by_device.setdefault(device, []).append((src, dst))
        resident = src.is_cuda and dst.is_cuda
        (on_device if resident else off_device).setdefault(device, []).append((src, dst))
        if src.device.type == dst.device.type:
            moved["d2d"] += src.nbytes
        elif dst.device.type == "cpu":
            moved["d2h"] += src.nbytes
        else:
            moved["h2d"] += src.nbytes
    return Sorted(
        by_device, on_device, off_device, len(copies), moved["h2d"], moved["d2h"], moved["d2d"]
    )


def cuda_device(src: torch.Tensor, dst: torch.Tensor) -> torch.device | None:
    """The CUDA device a copy runs on (the destination's first), or None for a CPU copy."""
    for tensor in (dst, src):
        if tensor.is_cuda:
            return tensor.device
    return None
