"""TieredCache: a transformers Cache whose full-attention layers live in kvtier's tiers.

Sliding-window layers keep HF's own bounded layer on the device; every other layer is a
TieredLayer (hf/layer.py) that hands its K/V to the TierController. Pass the cache to
`generate()` (or a plain forward loop) as `past_key_values` (or `cache`). What a cache holds
outside itself (controller, hook attachment, attention switch) is released by `close()` or, for
a cache dropped without it, when it is garbage-collected.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from kvtier.config import Config, load_config
from kvtier.controller import TierController, check_servers
from kvtier.errors import KVTierError
from kvtier.hf import attention, reuse
from kvtier.hf.hooks import ModelHooks
from kvtier.hf.layer import TieredLayer, warn_if_long
from kvtier.hf.models import describe, estimated_geometry
from kvtier.hf.reuse import ReuseState
from kvtier.layout import ContextPlan, KVGeometry, plan_context
from kvtier.measured import flush_learned

log = logging.getLogger(__name__)


class TieredCache(Cache):
    """A `transformers.Cache` that keeps full-attention KV in GPU, pinned host and disk tiers.

    Creating it attaches it to the hooks on `model` (layer-ahead prefetch, chunked prefill,
    token ids for block ids; installed by the first cache on the model, shared by every other);
    `close()` detaches it and frees its tiers. Any number of caches may live on one model, each
    independent; use one per sequence batch.
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
        check_servers(config)  # a wrong remote password or host is one line here, not later
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
        self._held = _Held()
        self.in_forward = False
        self._pending_ids: torch.Tensor | None = None  # token ids seen before the controller
        self._expected = 0  # positions the first call brings, planned once the controller exists
        self._pretend: int | None = None  # the length reported while prefill stubs the layers
        self._layer_major: tuple[torch.Tensor | None, int] | None = None  # (ids, positions)
        self._tiered_count = len(self.spec.tiered_layers)
        self._gathered: tuple[tuple, torch.Tensor] | None = None  # (key, [tokens, 2, b, h, d])
        self._gather_warned = False
        self._hooks, self.hook_token = ModelHooks.attach(
            model,
            self,
            decoder_layers=self.spec.decoder_layers,
            tiered_layers=self.spec.tiered_layers,
        )
        self._held.detach = functools.partial(self._hooks.detach, self.hook_token)
        # HF's SDPA becomes kvtier's (same results; prefill chunks without a materialized mask)
        if attention.install(model):
            self._held.attention_model = model
        self._model_config = model.config
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.reuse = ReuseState(model)  # prefix reuse at the first forward (hf/reuse.py)
        # a cache dropped without close() frees its tiers and hooks when it is collected
        self._finalizer = weakref.finalize(self, self._held.release)

    @property
    def controller(self) -> TierController | None:
        return self._held.controller

    @controller.setter
    def controller(self, controller: TierController | None) -> None:
        self._held.controller = controller

    @property
    def closed(self) -> bool:
        return self._held.closed

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
        if self.get_seq_length():
            raise KVTierError(
                "TieredCache cannot select batch rows of a filled cache; run the rows you keep "
                "through a new TieredCache (or use DynamicCache for this)"
            )

    # -- kvtier surface ------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-tier bytes and blocks, transfer counters and timings (JSON-serialisable); after
        close(), the stats as they were when it closed."""
        if self._held.final_stats is not None:
            return self._held.final_stats
        if self.controller is None:
            empty = {"bytes_used": 0, "blocks": 0, "bytes_written": 0, "bytes_read": 0}
            return {"gpu": dict(empty), "host": dict(empty), "disk": dict(empty), "tokens": 0}
        return self.controller.stats()

    def close(self) -> None:
        """Detach from the model's hooks (removed with the last cache on the model) and free
        every tier (persisted disk blocks stay). Using the cache afterwards raises KVTierError."""
        self._gathered = None
        self._finalizer()

    def gathered(self, tiered_index: int, kv: int) -> torch.Tensor | None:
        """Tiered layer `tiered_index`'s K (kv=0) or V (kv=1) `[batch, kv_heads, tokens,
        head_dim]` as a new tensor, or None before the first update (as DynamicLayer)."""
        self._check_open()
        controller = self.controller
        if controller is None:
            return None
        key = (id(controller), controller.epoch, controller.tokens, tiered_index)
        if self._gathered is None or self._gathered[0] != key:
            self._gathered = None  # drop the previous layer's copy before making this one
            layer = controller.read_layer(tiered_index)  # [tokens, 2, batch, kv_heads, head_dim]
            if not self._gather_warned:
                self._gather_warned = warn_if_long(tiered_index, layer.nbytes, layer.device)
            self._gathered = (key, layer)
        # a permuted view made contiguous is always a copy: the caller owns what it gets
        return self._gathered[1][:, kv].permute(1, 2, 0, 3).contiguous()

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(keys, values)` of model layer `layer_idx` (the legacy tuple view of one layer)."""
        layer = self.layers[layer_idx]
        return layer.keys, layer.values

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, object]]:
        """Per layer `(keys, values, sliding window tensor or None)`, as DynamicCache yields."""
        for layer in self.layers:
            yield layer.keys, layer.values, getattr(layer, "_sliding_window_tensor", None)

    def _check_open(self) -> None:
        if self._held.closed:
            raise KVTierError(
                "this TieredCache is closed; create a new TieredCache (or use kvtier.offload)"
            )

    def __enter__(self) -> TieredCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def forward_step(self, input_ids: torch.Tensor | None, new_tokens: int) -> Iterator[None]:
        """Bracket one model call: token ids for block ids, slots reserved, first prefetches."""
        self.in_forward = True
        self._gathered = None  # a copy made for keys / values is stale once the step runs
        try:
            if self.controller is not None:
                self.controller.note_tokens(input_ids)
                self.controller.begin_step(new_tokens)
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
            else:  # the step just ended (its last layer appended): the next one's first layers
                controller.prefetch(index - count)

    def _controller_for(self, key_states: torch.Tensor) -> TierController:
        if self.controller is None:
            self._check_open()
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

    def skip_stored_prefix(self, kwargs: dict, total: int) -> tuple[dict, int]:
        """StepDriver: load this call's stored prefix, if any (hf/reuse.py decides)."""
        return reuse.skip_prefix(self, kwargs, total)

    def note_call(self, total: int, device: torch.device) -> None:
        """StepDriver: a model call begins (a prefill's is timed)."""
        reuse.note_call(self, total, device)

    def note_done(self, device: torch.device) -> None:
        """StepDriver: the model call returned."""
        reuse.note_done(self, device)

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
            self._held.attention_model is not None
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


class _Held:
    """What a TieredCache holds outside itself, released once: by close() or when the cache is
    garbage-collected (so it must not refer to the cache)."""

    def __init__(self) -> None:
        self.controller: TierController | None = None
        self.detach: functools.partial | None = None  # leaves the model's hooks
        self.attention_model: torch.nn.Module | None = None
        self.closed = False
        self.final_stats: dict | None = None

    def release(self) -> None:
        self.closed = True
        if self.detach is not None:
            self.detach()
            self.detach = None
        if self.attention_model is not None:
            attention.uninstall(self.attention_model)
            self.attention_model = None
        if self.controller is not None:
            reuse.record_completed(wait=True)  # this cache's last prefill speeds
            flush_learned()  # and what it learned, on file before the next process looks
            self.final_stats = self.controller.stats()
            self.controller.close()
            self.controller = None
