"""The load calibration: how much longer (or shorter) than the cost model predicted this
process's, and earlier processes', prefix loads took, per source (costs.Source). Predictions
from a source are scaled by it; learned.json keeps each source's latest for the next process."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from kvtier.blocks import Tier
from kvtier.controller.costs import PAGE_CACHE, Choice, Source, source_name
from kvtier.controller.index import INDEX
from kvtier.measured import learned, load_key, save_learned_soon

# A load teaches the model only from this many bytes: below it, its time is mostly what a
# process pays once (on the H200 a new process's warm-up load of 3 blocks of 32 MiB took 4.4x
# its prediction, and that scale then made a 3.9 GB prefix in the page cache look slower than
# recomputing it). One bounce round (reuse.BOUNCE_BYTES).
CALIBRATION_BYTES = 256 << 20


def learned_name(source: Source) -> str:
    """A source's name in learned.json (tiers by their enum name: DISK, HOST, ...)."""
    return source.name if isinstance(source, Tier) else source_name(source)


def load_scales(device: str) -> dict[Source, float]:
    """Per source: this process's calibration, else the latest an earlier process saved."""
    scales = INDEX.load_scale()
    earlier = learned("loads")
    for source in [*Tier, PAGE_CACHE]:
        key = load_key(device, learned_name(source))
        if source not in scales and key in earlier:
            scales[source] = earlier[key][0]
    return scales


def record(
    device: str,
    choice: Choice,
    sources: Sequence[Source],
    *,
    loaded_bytes: int,
    load_s: float,
    scales: dict[Source, float],
) -> None:
    """A whole load of blocks from `sources` (each block's) took `load_s`; `scales`: what its
    prediction was scaled by. Filed under the source most of its blocks came from."""
    if loaded_bytes < CALIBRATION_BYTES or not sources:
        return
    source = Counter(sources).most_common(1)[0][0]
    INDEX.record_load(source, choice.predicted_load_s / scales.get(source, 1.0), load_s)
    save_learned_soon("loads", load_key(device, learned_name(source)), INDEX.load_scale()[source])
