"""Load or recompute: the predicted seconds of loading a stored prefix against computing it.

Loading a block costs a fixed overhead per block plus its bytes over the source's bandwidth
(measured by `kvtier bench` or by the remote tier itself, else assumed; a disk block whose file
the page cache holds comes at the page cache's speed, its own source); computing costs its
FLOPs (the matmuls' per position, plus attention's over every earlier position, so a block
deep in the prompt costs more than the first) over the model's prefill FLOP/s (measured in
this process with the same FLOP count, else a conservative default that makes loading look
good: a wrong "load" costs at most a few times a recompute, a wrong "recompute" of a long
prompt costs the whole prefill). Pure arithmetic: nothing is moved here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.blocks import Tier
from kvtier.measured import ASSUMED, ASSUMED_REMOTE_GBPS, copy_speed, disk_speeds, remote_speed

if TYPE_CHECKING:
    from kvtier.tiers.remote.url import RemoteSpec

# Per-block overhead of a load, seconds: a copy's Python and launch cost for memory tiers; an
# open, a header parse and a checksum pass set-up for a block file; a round trip to the server.
# Assumed, not measured (a 64-token fp32 SmolLM2 block took ~1 ms from disk on the 2-core VM).
# A disk block whose file the page cache holds (DiskTier.page_cached): read at memory speed, so
# a source of its own, with its own load calibration; otherwise a disk block (its overhead).
PAGE_CACHE = "page_cache"
Source = Tier | str  # a Tier, or PAGE_CACHE
BLOCK_OVERHEAD_S: dict[Source, float] = {
    Tier.GPU: 20e-6,
    Tier.HOST: 20e-6,
    Tier.DISK: 300e-6,
    PAGE_CACHE: 300e-6,
    Tier.REMOTE: 500e-6,
}


def source_name(source: Source) -> str:
    """How a source is named in reasons and in the learned load calibration."""
    return source if isinstance(source, str) else source.name.lower()


# Prefill FLOP/s assumed before a prefill ran in this process: low on purpose (a few percent of
# an H100's bf16 peak, a slow laptop core), so an unmeasured model prefers loading.
ASSUMED_PREFILL_FLOPS = {"cuda": 50e12, "cpu": 10e9}


@dataclass(frozen=True, slots=True)
class Bandwidths:
    """GB/s a block comes into the cache from each source, and where each figure comes from."""

    gbps: dict[Source, float]
    sources: dict[Source, str]


def bandwidths(
    *,
    cuda: bool,
    layer_bytes: int,
    disk_path: object,
    remote_spec: RemoteSpec | None = None,
) -> Bandwidths:
    """The load bandwidth of every tier: copies at `layer_bytes` per copy (one block layer).
    The disk's is what `kvtier bench` measured on it, the remote tier's what it measured on the
    server `remote_spec` names, else the assumed speeds. Measured loads of this process (and
    earlier ones) scale these predictions (`choose`'s `load_scale`), the same way for every
    tier; a tier's own raw figure is not swapped in, or the scale learned on the other base
    would count twice."""
    kind = "pinned_h2d" if cuda else "host_memcpy"
    copy = copy_speed(layer_bytes, kind=kind)
    speeds = disk_speeds(disk_path)
    disk, cached = speeds.load, speeds.cached  # the mover reads a prefix's blocks in parallel
    saved = remote_speed(remote_spec) if remote_spec is not None else None
    remote = saved.gbps if saved is not None else ASSUMED_REMOTE_GBPS
    remote_source = saved.source if saved is not None else "assumed"
    # a disk or remote block lands in host memory, then goes up: both legs count on CUDA
    up = 1 / (copy.gbps) if cuda else 0.0
    gbps = {
        Tier.GPU: copy.gbps * (10 if cuda else 1),  # device to device, or a host memcpy
        Tier.HOST: copy.gbps,
        Tier.DISK: 1 / (1 / disk.gbps + up),
        PAGE_CACHE: 1 / (1 / cached.gbps + up),
        Tier.REMOTE: 1 / (1 / remote + up),
    }
    sources = {Tier.GPU: copy.source, Tier.HOST: copy.source, Tier.DISK: disk.source}
    sources[PAGE_CACHE] = cached.source
    return Bandwidths(gbps, sources | {Tier.REMOTE: remote_source})


@dataclass(frozen=True, slots=True)
class PrefillFlops:
    """What computing positions of one batch row costs: `per_token` FLOPs of the matmuls at
    every position (2 per weight), and `per_pair` of attention per (query, key) pair (QK^T and
    AV: 4 x layers x query heads x head_dim), so position p costs per_token + per_pair (p + 1).
    The same count turns a measured prefill into FLOP/s and predicts a recompute from it."""

    per_token: float
    per_pair: float = 0.0

    def span(self, start: int, tokens: int) -> float:
        """FLOPs of computing positions [start, start + tokens), the ones before cached."""
        end = start + tokens
        pairs = (end * (end + 1) - start * (start + 1)) / 2  # position p attends to p + 1 keys
        return self.per_token * tokens + self.per_pair * pairs


def assumed_prefill_flops(*, cuda: bool) -> float:
    """Prefill FLOP/s assumed before any prefill of this model was measured."""
    return ASSUMED_PREFILL_FLOPS["cuda" if cuda else "cpu"]


@dataclass(frozen=True, slots=True)
class Choice:
    """How many of the stored prefix's blocks to load (the rest is recomputed), and why; the
    predictions are for the blocks loaded (for all stored ones when none is)."""

    blocks: int
    predicted_load_s: float
    predicted_recompute_s: float
    reason: str

    @property
    def decision(self) -> str:
        return "load" if self.blocks else "recompute"


def choose(
    tiers: list[Source],
    *,
    block_bytes: int,
    block_tokens: int,
    bandwidth: Bandwidths,
    flops: PrefillFlops,
    flops_per_s: float,
    rate_source: str,
    batch: int = 1,
    load_scale: Mapping[Source, float] | None = None,
) -> Choice:
    """The cut that minimises load time of blocks [0, m) plus recompute time of [m, n), where
    `tiers[i]` is where stored block i would come from (a Tier, or PAGE_CACHE for a disk block
    whose file the page cache holds) and recomputing block i costs its
    `batch` rows' FLOPs at its positions over `flops_per_s`. `load_scale[t]`: how much longer
    than predicted this process's loads from tier t took (ReuseIndex.load_scale). Ties go to
    loading."""
    scale = load_scale or {}
    per_block = [
        scale.get(t, 1.0) * (BLOCK_OVERHEAD_S[t] + block_bytes / (bandwidth.gbps[t] * 1e9))
        for t in tiers
    ]
    compute = [
        batch * flops.span(i * block_tokens, block_tokens) / flops_per_s for i in range(len(tiers))
    ]
    best, best_cost = 0, sum(compute)
    loaded, left = 0.0, best_cost
    for count, (seconds, computed) in enumerate(zip(per_block, compute, strict=True), start=1):
        loaded += seconds
        left -= computed
        if loaded + left <= best_cost:
            best, best_cost = count, loaded + left
    compared = best or len(tiers)  # the blocks both predictions are about
    load_s, recompute_s = sum(per_block[:compared]), sum(compute[:compared])
    used = sorted(set(tiers[:compared]), key=lambda t: (str(type(t)), t))
    speeds = ", ".join(
        f"{source_name(t)} {bandwidth.gbps[t]:.3g} GB/s ({_short(bandwidth.sources[t])}"
        + (f"; loads here took x{scale[t]:.2g} that" if t in scale else "")
        + ")"
        for t in used
    )
    first, last = block_tokens / compute[0], block_tokens / compute[compared - 1]
    prefill = (
        f"prefill {_flops_text(flops_per_s)} ({rate_source}): {first:,.0f} tok/s at "
        f"position 0, {last:,.0f} at {(compared - 1) * block_tokens:,}"
    )
    if best == len(tiers):
        reason = f"loading all {best} blocks is faster: {speeds} vs {prefill}"
    elif best:
        reason = (
            f"loading the first {best} of {len(tiers)} blocks is fastest: {speeds} vs {prefill}"
        )
    else:
        reason = f"recomputing is faster: {speeds} vs {prefill}"
    return Choice(best, load_s, recompute_s, reason)


def _flops_text(flops_per_s: float) -> str:
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:,.3g} TFLOP/s"
    return f"{flops_per_s / 1e9:,.3g} GFLOP/s"


def _short(source: str) -> str:
    return "assumed" if source == ASSUMED else source
