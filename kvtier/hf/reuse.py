"""Prefix reuse at the first forward: the prompt's stored prefix loaded, the model run on the rest.

The forward wrapper (hooks.py) calls `skip_prefix` on a multi-token call into an empty cache:
when blocks of the prompt are stored (another live cache of this process, the disk store, the
remote server) and loading beats computing them, they are loaded and the call goes on with the
keyword arguments of the remaining positions only (HF's logits for the last positions are the
same). It also times this process's prefill calls (their FLOPs, costs.PrefillFlops), the speed
the load-or-recompute choice weighs: from the call's start to its return, by CUDA events on a
GPU (read once they have completed: no device sync) and by the wall clock on CPU. Never touches
a tier.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from kvtier.controller import reuse
from kvtier.controller.costs import PrefillFlops
from kvtier.controller.index import INDEX
from kvtier.hf import prefill
from kvtier.hf.models import estimated_geometry
from kvtier.machine import device_name
from kvtier.measured import prefill_key, save_learned_soon

log = logging.getLogger(__name__)

_POSITIONAL = ("position_ids", "cache_position")


class ReuseState:
    """Per cache: the model's FLOPs per position (costs.PrefillFlops) and the prefill call
    being timed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.flops = prefill_flops(model)
        # the prefill call in progress: (first position, positions, wall start, CUDA start)
        self._timing: tuple[int, int, float, torch.cuda.Event | None] | None = None

    def start(self, first: int, tokens: int, device: torch.device) -> None:
        event = None
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
        self._timing = (first, tokens, time.perf_counter(), event)

    def finish(self, fingerprint: str, device: torch.device, *, batch: int) -> None:
        """The timed call of `batch` rows returned: its time is known now (CPU) or once its
        events complete."""
        if self._timing is None:
            return
        first, tokens, started, begin = self._timing
        self._timing = None
        flops = batch * self.flops.span(first, tokens)
        if begin is None:
            _record(device, fingerprint, flops, time.perf_counter() - started)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(device))
        with _PENDING_LOCK:
            _PENDING.append((device, fingerprint, flops, begin, end))

    def cancel(self) -> None:
        self._timing = None


# timed GPU prefills whose events may not have completed yet:
# (device, fingerprint, FLOPs, start, end)
_PENDING: list[tuple[torch.device, str, float, torch.cuda.Event, torch.cuda.Event]] = []
_PENDING_LOCK = threading.Lock()


def record_completed(*, wait: bool = False) -> None:
    """Record the prefill times of timed GPU calls that have completed (`wait`: of every timed
    call, waiting for their end; a closing cache does, or a process's last prefill, often its
    fastest, would never be recorded)."""
    with _PENDING_LOCK:
        done = [entry for entry in _PENDING if wait or entry[4].query()]
        _PENDING[:] = [entry for entry in _PENDING if entry not in done]
    for device, fingerprint, flops, begin, end in done:
        end.synchronize()  # done already unless waiting
        _record(device, fingerprint, flops, begin.elapsed_time(end) / 1e3)


def _record(device: torch.device, fingerprint: str, flops: float, seconds: float) -> None:
    """One timed call; a new fastest one is also saved for later processes on this machine
    (measured.save_learned_soon), which would otherwise start from an assumed speed."""
    fastest = INDEX.record_prefill(fingerprint, flops, seconds)
    if fastest is not None:
        key = prefill_key(device_name(device), fingerprint)
        save_learned_soon("prefill", key, fastest, only_if_higher=True)


def prefill_flops(model: torch.nn.Module) -> PrefillFlops:
    """The model's prefill FLOPs: 2 per weight a position (embedding lookups aside), and per
    (query, key) pair 4 x layers x query heads x head_dim (QK^T and AV), read from its config."""
    parameters = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    lookups = weight.numel() if isinstance(weight, torch.Tensor) else 0
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if config is not None else None
    heads = getattr(text, "num_attention_heads", None) or 0
    head_dim = getattr(text, "head_dim", None) or (
        getattr(text, "hidden_size", 0) // heads if heads else 0
    )
    layers = getattr(text, "num_hidden_layers", None) or 0
    return PrefillFlops(
        per_token=2.0 * max(parameters - lookups, 1), per_pair=4.0 * layers * heads * head_dim
    )


def note_call(cache: Any, total: int, device: torch.device) -> None:
    """A call of the wrapped forward begins: time it if it computes several positions (after
    the cached ones)."""
    record_completed()
    if total >= cache.cfg.block_tokens:
        cache.reuse.start(cache.cached_tokens(), total, device)
    else:
        cache.reuse.cancel()


def note_done(cache: Any, device: torch.device) -> None:
    """The call `note_call` began returned."""
    controller = cache.controller  # the timed call's, which made it
    batch = controller.geometry.batch if controller is not None else 1
    cache.reuse.finish(cache.spec.fingerprint, device, batch=batch)


def skip_prefix(cache: Any, kwargs: dict, total: int) -> tuple[dict, int]:
    """Load the stored prefix of this call's prompt into `cache` when it is the first call of a
    sequence; returns the keyword arguments of the positions left to compute, and how many
    positions were loaded (0: `kwargs` unchanged)."""
    keep = kwargs.get("logits_to_keep", 0)
    if not _reusable(cache, kwargs, total, keep):
        return kwargs, 0
    input_ids = kwargs["input_ids"]
    bt = cache.cfg.block_tokens
    # at least `keep` positions (>= 1) are computed: their logits are the call's output
    max_blocks = (total - keep) // bt
    if max_blocks <= 0:
        return kwargs, 0
    record_completed()  # the prefill speeds measured so far weigh the choice
    controller = cache.controller
    if controller is None:
        spec = cache.spec
        geometry = estimated_geometry(
            spec,
            cache._model_config,
            batch=input_ids.shape[0],
            dtype=cache._dtype,
            block_tokens=bt,
        )
        if any(device.type == "meta" for device in geometry.layer_devices):
            return kwargs, 0  # weights offloaded by accelerate: the K/V device is not known yet
        controller = cache.make_controller(geometry)
    loaded = reuse.load_prefix(
        controller,
        input_ids.detach().to("cpu"),
        max_blocks=max_blocks,
        flops=cache.reuse.flops,
    )
    if not loaded:
        return kwargs, 0
    log.debug("prefix reuse: %d of %d prompt positions loaded", loaded, total)
    return prefill.chunk_kwargs(kwargs, loaded, total, total), loaded


def _reusable(cache: Any, kwargs: dict, total: int, keep: object) -> bool:
    """Whether this call may skip a stored prefix: the first of a sequence (nothing cached),
    token ids known, nothing but sequence tensors passed (no image inputs), only the last positions' logits wanted, no padding, default positions,
    every layer tiered (HF's sliding-window layers keep no stored blocks), no autocast (the K/V
    dtype must be the weights')."""
    input_ids = kwargs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or total < 2:
        return False
    if kwargs.get("inputs_embeds") is not None or isinstance(keep, bool):
        return False
    if not prefill.splittable(kwargs):
        return False  # e.g. pixel_values: which positions an image fills only the model knows
    if not isinstance(keep, int) or keep < 1:
        return False  # logits_to_keep = 0 asks for every position's logits: compute them all
    controller = cache.controller
    if cache.cached_tokens() or (controller is not None and len(controller.table)):
        return False
    spec = cache.spec
    if not spec.tiered_layers or any(window is not None for window in spec.sliding_windows):
        return False
    if torch.is_autocast_enabled():
        return False
    mask = kwargs.get("attention_mask")
    if mask is not None and (mask.dim() != 2 or mask.shape[1] != total or not bool(mask.all())):
        return False
    for name in _POSITIONAL:
        positions = kwargs.get(name)
        if positions is not None:
            expected = torch.arange(total, device=positions.device)
            if positions.shape[-1] != total or not bool((positions == expected).all()):
                return False
    return True
