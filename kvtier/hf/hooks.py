"""Hooks on a HF model: step start (token ids, chunked prefill), layer-ahead prefetch.

One ModelHooks per model, shared by every TieredCache on it (reference-counted: the last cache to
detach removes it). The model's forward is wrapped so kvtier sees each call's input ids and can
split a long prompt into `prefill_chunk_tokens` chunks; the wrapper serves the cache passed in
that call's `cache=` / `past_key_values=` keyword and runs any other call untouched. While a
cache streams layers, forward pre-hooks on the decoder layers start the prefetch of the next
`prefetch_depth` tiered layers for the cache of the call in progress, a post-hook on each tiered
layer's attention (`self_attn`) starts the gather that reuses its staging buffer as soon as the
attention is queued, and the last layer's post-hook starts layer 0 of the next step. Caches are
held weakly.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import weakref
from typing import Any, Protocol

import torch

from kvtier.hf import prefill

# transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name still works)
CACHE_KWARGS = ("cache", "past_key_values")
_ATTRIBUTE = "_kvtier_hooks"  # on the model: its ModelHooks while any cache is attached


class StepDriver(prefill.PrefillDriver, Protocol):
    """What the hooks drive: a cache attached to them (TieredCache implements it)."""

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

    def skip_stored_prefix(self, kwargs: dict, total: int) -> tuple[dict, int]:
        """Load a stored prefix of this call's prompt; the call's arguments for the positions
        left to compute, and how many were loaded (0: `kwargs` unchanged)."""
        ...

    def note_call(self, total: int, device: torch.device) -> None:
        """A model call of `total` positions to compute, inputs on `device`, begins (prefill
        timing)."""
        ...

    def note_done(self, device: torch.device) -> None:
        """The call `note_call` announced returned."""
        ...


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword the model's forward (and generate) takes its cache by: `cache` from
    transformers 5.24 on, `past_key_values` before (5.24 still accepts it, with a warning)."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def passed_cache(kwargs: dict) -> Any:
    """The cache a forward or generate call was given, under either name, or None."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


class ModelHooks:
    """kvtier's hooks on one model, shared by the caches attached to it."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        decoder_layers: tuple[torch.nn.Module, ...],
        tiered_layers: tuple[int, ...],
    ) -> None:
        self.model = model
        self._layers = decoder_layers
        # for each decoder layer: the first tiered index at or after it
        self._next_tiered = [
            sum(1 for t in tiered_layers if t < i) for i in range(len(decoder_layers))
        ]
        self._tiered = frozenset(tiered_layers)
        self._drivers: dict[int, weakref.ref] = {}  # token -> attached cache
        self._tokens = itertools.count(1)
        self.active: weakref.ref | None = None  # the cache of the forward call in progress
        self._handles: list = []  # the layer hooks, present only while layers are prefetched
        self._had_forward = "forward" in model.__dict__
        self._original_forward = model.forward
        ref = weakref.ref(self)
        model.forward = functools.wraps(self._original_forward)(
            functools.partial(_model_forward, ref, self._original_forward)
        )

    @classmethod
    def attach(
        cls,
        model: torch.nn.Module,
        driver: StepDriver,
        *,
        decoder_layers: tuple[torch.nn.Module, ...],
        tiered_layers: tuple[int, ...],
    ) -> tuple[ModelHooks, int]:
        """The model's hooks (installed now if no cache had them) and `driver`'s token in them."""
        hooks = model.__dict__.get(_ATTRIBUTE)
        if hooks is None:
            hooks = cls(model, decoder_layers=decoder_layers, tiered_layers=tiered_layers)
            model.__dict__[_ATTRIBUTE] = hooks
        token = next(hooks._tokens)
        hooks._drivers[token] = weakref.ref(driver)
        return hooks, token

    def detach(self, token: int) -> None:
        """Forget one cache; after the last, remove every hook and restore the model."""
        self._drivers.pop(token, None)
        if not self._drivers:
            self.remove()

    @property
    def attached(self) -> int:
        return len(self._drivers)

    def driver_for(self, cache: Any) -> StepDriver | None:
        """`cache` if it is attached to these hooks (a TieredCache of this model), else None."""
        ref = self._drivers.get(getattr(cache, "hook_token", None))
        return cache if ref is not None and ref() is cache else None

    @property
    def prefetching(self) -> bool:
        return bool(self._handles)

    def set_prefetching(self, enabled: bool) -> None:
        """Install (or remove) the per-layer hooks that start prefetches: needed only while the
        cache of the call streams layers; a layer with no hooks costs the forward nothing."""
        if enabled == self.prefetching:
            return
        if not enabled:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            return
        ref = weakref.ref(self)
        for i, (layer, tiered_index) in enumerate(
            zip(self._layers, self._next_tiered, strict=True)
        ):
            hook = functools.partial(_layer_pre_hook, ref, tiered_index)
            self._handles.append(layer.register_forward_pre_hook(hook))
            attention = getattr(layer, "self_attn", None)
            if i in self._tiered and isinstance(attention, torch.nn.Module):
                # the layer's staging buffer is free (on the stream) once its attention is
                # queued: the gather that reuses it starts now, not at the next layer's start
                after = functools.partial(_post_hook, ref, tiered_index + 1)
                self._handles.append(attention.register_forward_hook(after))
        last = functools.partial(_post_hook, ref, 0)  # the next step's first layers
        self._handles.append(self._layers[-1].register_forward_hook(last))

    def remove(self) -> None:
        self.set_prefetching(False)
        self._drivers.clear()
        if self._original_forward is not None:
            if self._had_forward:
                self.model.forward = self._original_forward
            else:
                self.model.__dict__.pop("forward", None)
            self._original_forward = None
        if self.model.__dict__.get(_ATTRIBUTE) is self:
            del self.model.__dict__[_ATTRIBUTE]


def _active(ref: weakref.ref) -> StepDriver | None:
    hooks = ref()
    cache = None if hooks is None or hooks.active is None else hooks.active()
    return cache if cache is not None and cache.in_forward else None


def _layer_pre_hook(ref: weakref.ref, tiered_index: int, module, args) -> None:
    cache = _active(ref)
    if cache is not None:
        cache.prefetch_from(tiered_index)


def _post_hook(ref: weakref.ref, tiered_index: int, module, args, output) -> None:
    cache = _active(ref)
    if cache is not None:
        cache.prefetch_from(tiered_index)


def _model_forward(ref: weakref.ref, original, *args: Any, **kwargs: Any):
    hooks = ref()
    cache = None if hooks is None else hooks.driver_for(passed_cache(kwargs))
    if cache is None or len(args) > 1:
        return original(*args, **kwargs)
    previous, hooks.active = hooks.active, hooks._drivers[cache.hook_token]
    try:
        return _cache_forward(cache, original, args, kwargs)
    finally:
        hooks.active = previous


def _cache_forward(cache: StepDriver, original, args: tuple, kwargs: dict):
    """One model call through `cache`: planned, then whole, chunk by chunk or layer by layer."""
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
        kwargs, skipped = cache.skip_stored_prefix(kwargs, total)  # a stored prefix: loaded
        total -= skipped
    cache.note_call(total, source.device)
    output = _run_call(cache, original, kwargs, total)
    cache.note_done(source.device)
    return output


def _run_call(cache: StepDriver, original, kwargs: dict, total: int):
    chunk = cache.prefill_chunk_tokens
    mask = kwargs.get("attention_mask")
    whole = total <= chunk or (mask is not None and mask.dim() != 2)
    if whole or not prefill.splittable(kwargs):
        with cache.forward_step(kwargs.get("input_ids"), total):
            return original(**kwargs)
    layers = cache.layer_major_layers(kwargs, total)
    if layers is None:
        return prefill.chunk_major(cache, original, kwargs, total, chunk)
    past = cache.cached_tokens()
    return prefill.layer_major(
        cache, original, kwargs, total=total, chunk=chunk, past=past, layers=layers
    )
