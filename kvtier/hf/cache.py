"""TieredCache: a transformers Cache whose full-attention layers live in kvtier's tiers.

Sliding-window layers keep HF's own bounded layer on the device; every other layer is a
TieredLayer that hands its K/V to the TierController. Pass the cache to `generate()` (or a
plain forward loop) as `past_key_values`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvtier.config import Config, load_config
from kvtier.controller import TierController
from kvtier.errors import KVTierError
from kvtier.hf import attention
from kvtier.hf.hooks import HookSet
from kvtier.hf.models import describe, estimated_geometry
from kvtier.hf.reuse import ReuseState
from kvtier.layout import ContextPlan, KVGeometry, plan_context

log = logging.getLogger(__name__)


class TieredLayer(CacheLayerMixin):
    """One full-attention layer; its state lives in the cache's controller."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: TieredCache, tiered_index: int) -> None:
        super().__init__()
        self._cache = cache
        self.tiered_index = tiered_index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        controller = self._cache._controller_for(key_states)
        return controller.append(self.tiered_index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self._cache.cached_tokens()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        controller = self._cache.controller
        return -1 if controller is None else controller.geometry.batch

    # crop / reorder / reset act on the whole controller once, from TieredCache
    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def reset(self) -> None:
        pass

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


class TieredCache(Cache):
    """A `transformers.Cache` that keeps full-attention KV in GPU, pinned host and disk tiers.

    Creating it installs hooks on `model` (layer-ahead prefetch, chunked prefill, token ids for
    block ids); `close()` removes them. Use one cache per sequence batch.
    """

    def __init__(
        self, model: torch.nn.Module, config: Config | str | os.PathLike | None = None
    ) -> None:
        if config is None or isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        elif not isinstance(config, Config):
            raise KVTierError(
                f"config must be a kvtier.Config or a TOML path, not {type(config).__name__}; "
                "use kvtier.load_config(...)"
            )
        self.cfg = config
        self.spec = describe(model, model_key=config.disk.model_key)
        layers: list[CacheLayerMixin] = []
        for window in self.spec.sliding_windows:
            if window is None:
                layers.append(
                    TieredLayer(self, len([x for x in layers if isinstance(x, TieredLayer)]))
                )
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
        super().__init__(layers=layers)
        self.controller: TierController | None = None
        self.in_forward = False
        self._pending_ids: torch.Tensor | None = None  # token ids seen before the controller
        self._expected = 0  # positions the first call brings, planned once the controller exists
        self._pretend: int | None = None  # the length reported while prefill stubs the layers
        self._layer_major: tuple[torch.Tensor | None, int] | None = None  # (ids, positions)
        self._tiered_count = len(self.spec.tiered_layers)
        self._hooks: HookSet | None = HookSet(
            model,
            self,
            decoder_layers=self.spec.decoder_layers,
            tiered_layers=self.spec.tiered_layers,
        )
        # HF's SDPA becomes kvtier's (same results; prefill chunks without a materialized mask)
        self._attention_model = model if attention.install(model) else None
        self._model_config = model.config
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.reuse = ReuseState(model)  # prefix reuse at the first forward (hf/reuse.py)

    @property
    def prefill_chunk_tokens(self) -> int:
        return self.cfg.prefill_chunk_tokens

    # -- HF Cache surface ----------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        tokens_to_remove = int(tokens_to_remove)  # transformers 5.17 passes a 0-d tensor
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as "
                "transformers 5 caches expect"
            )
        if self.controller is not None and tokens_to_remove < 0:
            self.controller.crop(self.controller.tokens + tokens_to_remove)
        for layer in self.layers:
            if not isinstance(layer, TieredLayer):
                layer.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.controller is not None and self.controller.tokens:
            self.controller.reorder(beam_idx)
        for layer in self.layers:
            if not isinstance(layer, TieredLayer):
                layer.reorder_cache(beam_idx)

    def reset(self) -> None:
        if self.controller is not None:
            self.controller.close()
            self.controller = None
        for layer in self.layers:
            if not isinstance(layer, TieredLayer):
                layer.reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            raise KVTierError(
                "TieredCache cannot repeat a filled cache across the batch; pass an empty "
                "TieredCache to generate (it expands inputs before prefill)"
            )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise KVTierError("TieredCache does not support selecting batch rows of a filled cache")

    # -- kvtier surface ------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-tier bytes and blocks, transfer counters and timings (JSON-serialisable)."""
        if self.controller is None:
            empty = {"bytes_used": 0, "blocks": 0, "bytes_written": 0, "bytes_read": 0}
            return {"gpu": dict(empty), "host": dict(empty), "disk": dict(empty), "tokens": 0}
        return self.controller.stats()

    def close(self) -> None:
        """Remove the model hooks and free every tier (persisted disk blocks stay)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        if self._attention_model is not None:
            attention.uninstall(self._attention_model)
            self._attention_model = None
        if self.controller is not None:
            self.controller.close()
            self.controller = None

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def forward_step(self, input_ids: torch.Tensor | None, new_tokens: int) -> Iterator[None]:
        """Bracket one model call: token ids for block ids, slots reserved, first prefetches."""
        self.in_forward = True
        try:
            if self.controller is not None:
                self.controller.note_tokens(input_ids)
                self.controller.begin_step(new_tokens)
                if self._hooks is not None:
                    self._hooks.set_prefetching(self.controller.streaming)
                self.prefetch_from(0)
            else:
                self._pending_ids = input_ids
            yield
        finally:
            self.in_forward = False
            if self.controller is not None and self.controller.in_step:
                # the forward failed midway: drop the half-written step
                self.controller.abort_step()

    def prefetch_from(self, tiered_index: int) -> None:
        """Start gathering tiered layers tiered_index .. tiered_index + prefetch_depth (those
        past the last layer are the next step's first ones)."""
        controller = self.controller
        if controller is None:
            return
        count = self._tiered_count
        for index in range(tiered_index, tiered_index + controller.depth + 1):
            if index < count:
                controller.prefetch(index)
            elif controller.in_step:  # past the last layer: the next step's first layers
                controller.prefetch(index - count, next_step=True)

    def _controller_for(self, key_states: torch.Tensor) -> TierController:
        if self.controller is None:
            devices = [self.spec.layer_devices[i] for i in self.spec.tiered_layers]
            # the first tiered layer's device comes from the tensor itself (accelerate offload)
            devices[0] = key_states.device
            geometry = KVGeometry(
                layer_ids=self.spec.tiered_layers,
                layer_devices=tuple(devices),
                batch=key_states.shape[0],
                kv_heads=key_states.shape[1],
                head_dim=key_states.shape[3],
                dtype=key_states.dtype,
                block_tokens=self.cfg.block_tokens,
            )
            self.make_controller(geometry)
        return self.controller

    def make_controller(self, geometry: KVGeometry) -> TierController:
        """Build the controller for `geometry` (at the first K/V, or earlier for prefix reuse)."""
        self.controller = TierController(self.cfg, geometry, fingerprint=self.spec.fingerprint)
        self.controller.note_tokens(self._pending_ids)
        self._pending_ids = None
        if self._expected:
            self.controller.plan(self._expected)
            self._expected = 0
        if self._layer_major is not None:
            self._begin_layer_major()
        return self.controller

    # -- prefill (hf/prefill.py drives these) --------------------------------------------------
    def cached_tokens(self) -> int:
        """Positions cached so far (what a stubbed prefill pass must see, while one runs)."""
        if self._pretend is not None:
            return self._pretend
        return 0 if self.controller is None else self.controller.tokens

    def pretend_length(self, tokens: int | None) -> None:
        self._pretend = tokens

    @contextlib.contextmanager
    def layer_major(self, input_ids: torch.Tensor | None, new_tokens: int) -> Iterator[None]:
        """Bracket a layer-major prefill: one step whose layers each append `new_tokens`
        positions in chunks (it begins when the first layer runs if no controller exists yet)."""
        self._layer_major = (input_ids, new_tokens)
        try:
            if self.controller is not None:
                self._begin_layer_major()
            yield
        finally:
            self._layer_major = None
            if self.controller is not None and self.controller.in_step:
                self.controller.abort_step()  # a layer failed midway: drop the half prefill

    def _begin_layer_major(self) -> None:
        input_ids, new_tokens = self._layer_major
        self._layer_major = None
        self.controller.note_tokens(input_ids)
        self.controller.begin_layer_major(new_tokens)

    def _plan_estimate(self, kwargs: dict, new_tokens: int) -> ContextPlan | None:
        if self.controller is not None:
            return self.controller.plan(self.controller.tokens + new_tokens)
        source = kwargs.get("input_ids")
        source = kwargs.get("inputs_embeds") if source is None else source
        if source is None or not self.spec.tiered_layers:
            return None
        cfg = self.cfg
        geometry = estimated_geometry(
            self.spec,
            self._model_config,
            batch=source.shape[0],
            dtype=self._dtype,
            block_tokens=cfg.block_tokens,
        )
        return plan_context(
            geometry,
            new_tokens,
            gpu_budget=cfg.gpu.budget_bytes,
            host_budget=cfg.host.budget_bytes,
            disk_budget=cfg.disk.budget_bytes,
            buffers=cfg.policy.prefetch_depth + 1,
        )

    def layer_major_layers(
        self, kwargs: dict, new_tokens: int
    ) -> tuple[torch.nn.Module, ...] | None:
        """The decoder layers to prefill this call layer by layer (FlexGen's order), or None.

        Worth it when the sequence streams (its blocks do not fit the GPU whole: chunk by chunk,
        every chunk would read all the past back per layer) and possible when every layer is
        tiered, attention runs kvtier's function (no mask is built per chunk), no row is padded,
        and the GPU and host hold every new block (they are complete only after the last
        layer, so none can go to disk before)."""
        mask = kwargs.get("attention_mask")
        possible = (
            self._attention_model is not None
            and all(window is None for window in self.spec.sliding_windows)
            and (mask is None or bool(mask.all()))
        )
        if not possible:
            return None
        plan = self._plan_estimate(kwargs, new_tokens)
        if plan is None or plan.in_place or plan.disk_blocks:
            return None
        return self.spec.decoder_layers

    def expect(self, new_tokens: int) -> None:
        """Plan the next call's `new_tokens` positions: BudgetError at once if they cannot fit,
        room reserved ahead if they can (before the controller exists: when it is made)."""
        if self.controller is None:
            self._expected = new_tokens
        else:
            self.controller.plan(self.controller.tokens + new_tokens)


@contextlib.contextmanager
def offload(model: torch.nn.Module, config: Config | None = None) -> Iterator[TieredCache]:
    """Install kvtier on `model` for the block; yields the TieredCache, removes all on exit."""
    cache = TieredCache(model, config)
    try:
        yield cache
    finally:
        cache.close()
