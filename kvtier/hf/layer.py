"""TieredLayer: one full-attention layer of a TieredCache, as HF's cache layer contract sees it.

Its K/V live in the cache's controller. `keys` / `values` answer as DynamicLayer's do (same shape,
dtype and values) by gathering the layer from every tier on demand into a fresh tensor: reading
them never changes a block, and writing to what they return never reaches the cache.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Protocol

import torch
from transformers.cache_utils import CacheLayerMixin

from kvtier.errors import KVTierError

# Reading `keys` / `values` of a layer whose K/V exceed this many bytes warns once per cache: it
# puts the whole context of the layer on its device at once, which is what tiering avoids.
GATHER_WARN_BYTES = 1 << 30


class LayerOwner(Protocol):
    """What a TieredLayer asks of its cache (TieredCache implements it)."""

    controller: Any  # the TierController, None before the first update

    def gathered(self, tiered_index: int, kv: int) -> torch.Tensor | None: ...

    def cached_tokens(self) -> int: ...

    def _controller_for(self, key_states: torch.Tensor) -> Any: ...


class TieredLayer(CacheLayerMixin):
    """One full-attention layer; its state lives in the cache's controller."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: LayerOwner, tiered_index: int) -> None:
        super().__init__()
        self._cache_ref = weakref.ref(cache)  # a layer must not keep its cache alive
        self.tiered_index = tiered_index

    @property
    def _cache(self) -> LayerOwner:
        cache = self._cache_ref()
        if cache is None:
            raise KVTierError(
                "this TieredLayer's TieredCache was garbage-collected; keep the cache"
            )
        return cache

    # HF's mixin assigns `keys` / `values` (None in __init__, tensors in its own offload and
    # reorder paths, which this class overrides): they are read-only views of the tiers here
    @property
    def keys(self) -> torch.Tensor | None:
        """The layer's K `[batch, kv_heads, tokens, head_dim]`, gathered from every tier (a copy)."""
        return self._cache.gathered(self.tiered_index, 0)

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        _refuse_assignment("keys", value)

    @property
    def values(self) -> torch.Tensor | None:
        """The layer's V `[batch, kv_heads, tokens, head_dim]`, gathered from every tier (a copy)."""
        return self._cache.gathered(self.tiered_index, 1)

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        _refuse_assignment("values", value)

    @property
    def is_initialized(self) -> bool:
        cache = self._cache_ref()
        return cache is not None and cache.controller is not None

    @is_initialized.setter
    def is_initialized(self, value: bool) -> None:
        pass  # follows the cache's controller (made by the first update, dropped by reset)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device

    def update(self, key_states, value_states, *args, **kwargs):
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

    # crop / reorder / reset / batch edits act on the whole controller once, from TieredCache
    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass

    def reset(self) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass

    def offload(self) -> None:
        pass  # kvtier moves K/V itself

    def prefetch(self) -> None:
        pass


def _refuse_assignment(name: str, value: object) -> None:
    if value is not None:
        raise KVTierError(
            f"TieredLayer.{name} is read-only (gathered from the tiers); change the cache with "
            "update(), crop() or reorder_cache()"
        )


def warn_if_long(tiered_index: int, nbytes: int, device: torch.device) -> bool:
    """Warn (and return True) if a layer read whole is longer than GATHER_WARN_BYTES; the cache
    calls it until it first returns True, so it warns once per cache."""
    if nbytes <= GATHER_WARN_BYTES:
        return False
    message = (
        f"TieredLayer.keys/.values gathered {nbytes / 2**30:.2f} GiB of tiered layer "
        f"{tiered_index} onto {device} at once; the tiers hold it so the device need not"
    )
    warnings.warn(message, UserWarning, stacklevel=4)
    return True
