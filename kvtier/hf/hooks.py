"""Hooks on a HF model: step start (token ids, chunked prefill), layer-ahead prefetch.

The model's forward is wrapped so kvtier sees each call's input ids and can split a long
prompt into `prefill_chunk_tokens` chunks; while the cache streams layers, forward pre-hooks
on the decoder layers start the prefetch of the next `prefetch_depth` tiered layers and the
last layer's post-hook starts layer 0 of the next step. Hooks hold the cache weakly and do
nothing for any other cache.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Protocol

import torch

from kvtier.hf import prefill, reuse

# transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name still works)
_CACHE_KWARGS = ("cache", "past_key_values")


class StepDriver(prefill.PrefillDriver, Protocol):
    """What the hooks drive: the cache they were installed for (TieredCache implements it)."""

    in_forward: bool
    prefill_chunk_tokens: int

    def prefetch_from(self, tiered_index: int) -> None:
        """Start gathering tiered layers from `tiered_index` on."""
        ...

    def expect(self, new_tokens: int) -> None:
        """The next model call brings `new_tokens` positions (plan them; refuse what cannot fit)."""
        ...

    def cached_tokens(self) -> int:
        """Positions cached so far."""
        ...

    def layer_major_layers(
        self, kwargs: dict, new_tokens: int
    ) -> tuple[torch.nn.Module, ...] | None:
        """The decoder layers to prefill this call layer by layer, or None for chunk by chunk."""
        ...


class HookSet:
    """Installed hooks of one driver on one model; `remove()` restores the model."""

    def __init__(
        self,
        model: torch.nn.Module,
        driver: StepDriver,
        *,
        decoder_layers: tuple[torch.nn.Module, ...],
        tiered_layers: tuple[int, ...],
    ) -> None:
        self.model = model
        self._ref = ref = weakref.ref(driver)
        self._layers = decoder_layers
        # for each decoder layer: the first tiered index at or after it
        self._next_tiered = [
            sum(1 for t in tiered_layers if t < i) for i in range(len(decoder_layers))
        ]
        self._handles: list = []  # the layer hooks, present only while layers are prefetched
        self._had_forward = "forward" in model.__dict__
        self._original_forward = model.forward
        model.forward = functools.wraps(self._original_forward)(
            functools.partial(_model_forward, ref, self._original_forward)
        )

    @property
    def prefetching(self) -> bool:
        return bool(self._handles)

    def set_prefetching(self, enabled: bool) -> None:
        """Install (or remove) the per-layer hooks that start prefetches: needed only while the
        cache streams layers; a layer with no hooks costs the model's forward nothing extra."""
        if enabled == self.prefetching:
            return
        if not enabled:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            return
        for layer, tiered_index in zip(self._layers, self._next_tiered, strict=True):
            hook = functools.partial(_layer_pre_hook, self._ref, tiered_index)
            self._handles.append(layer.register_forward_pre_hook(hook))
        last = functools.partial(_last_post_hook, self._ref)
        self._handles.append(self._layers[-1].register_forward_hook(last))

    def remove(self) -> None:
        self.set_prefetching(False)
        if self._original_forward is not None:
            if self._had_forward:
                self.model.forward = self._original_forward
            else:
                self.model.__dict__.pop("forward", None)
            self._original_forward = None


def _layer_pre_hook(ref: weakref.ref, tiered_index: int, module, args) -> None:
    cache = ref()
    if cache is None or not cache.in_forward:
        return
    cache.prefetch_from(tiered_index)


def _last_post_hook(ref: weakref.ref, module, args, output) -> None:
    cache = ref()
    if cache is None or not cache.in_forward:
        return
    cache.prefetch_from(0)


def _model_forward(ref: weakref.ref, original, *args: Any, **kwargs: Any):
    cache = ref()
    passed = any(kwargs.get(name) is cache for name in _CACHE_KWARGS)
    if cache is None or not passed or len(args) > 1:
        return original(*args, **kwargs)
    if args:
        kwargs["input_ids"] = args[0]
    source = kwargs.get("input_ids")
    if source is None:
        source = kwargs.get("inputs_embeds")
    if source is None:
        return original(*args, **kwargs)
    total = source.shape[1]
    if total > 1:
        cache.expect(total)  # a job that cannot fit is refused now, before any of it runs
        kwargs, skipped = reuse.skip_prefix(cache, kwargs, total)  # a stored prefix: loaded
        total -= skipped
    reuse.note_call(cache, total)
    chunk = cache.prefill_chunk_tokens
    mask = kwargs.get("attention_mask")
    if total <= chunk or (mask is not None and mask.dim() != 2):
        with cache.forward_step(kwargs.get("input_ids"), total):
            return original(**kwargs)
    layers = cache.layer_major_layers(kwargs, total)
    if layers is None:
        return prefill.chunk_major(cache, original, kwargs, total, chunk)
    past = cache.cached_tokens()
    return prefill.layer_major(
        cache, original, kwargs, total=total, chunk=chunk, past=past, layers=layers
    )
