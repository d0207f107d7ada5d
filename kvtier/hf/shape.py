"""What a model's config says about its KV, without its weights: the tiered layers and their shape.

`describe` (models.py) and `kvtier plan` decide which layers are tiered here, the same way: by
asking transformers what cache it would build for the config. Reads configs only; never loads
weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvtier.errors import UnsupportedModelError

_MLA_KEYS = ("kv_lora_rank", "q_lora_rank")


@dataclass(frozen=True, slots=True)
class KVShape:
    """The KV of one position as the config describes it."""

    model_type: str
    # per decoder layer: None for a tiered (full-attention) layer, else its sliding window
    sliding_windows: tuple[int | None, ...]
    kv_heads: int
    head_dim: int

    @property
    def tiered_layers(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.sliding_windows) if w is None)


def read_config(directory: str | os.PathLike[str]) -> PreTrainedConfig:
    """The config in `directory` (config.json), from local files only; never remote code."""
    return AutoConfig.from_pretrained(Path(directory), local_files_only=True)


def text_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The decoder's config; UnsupportedModelError for layouts kvtier cannot tier."""
    model_type = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"model type {model_type!r} is encoder-decoder; kvtier tiers decoder-only models"
        )
    text = config.get_text_config(decoder=True)
    if any(getattr(text, key, None) for key in _MLA_KEYS):
        raise UnsupportedModelError(
            f"model type {model_type!r} uses multi-head latent attention (MLA), whose cache "
            "layout kvtier does not tier yet"
        )
    return text


def sliding_windows(text: PreTrainedConfig, model_type: str) -> list[int | None]:
    """Per cache layer transformers would build: None (full attention, tiered) or its window."""
    try:
        reference = DynamicCache(config=text)
    except Exception as exc:  # HF itself cannot build a dynamic cache for it
        raise UnsupportedModelError(
            f"model type {model_type!r}: transformers cannot describe its cache ({exc})"
        ) from exc
    windows: list[int | None] = []
    for index, layer in enumerate(reference.layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            windows.append(int(layer.sliding_window))
        elif type(layer) is DynamicLayer:
            windows.append(None)
        else:
            raise UnsupportedModelError(
                f"model type {model_type!r}: layer {index} uses a {type(layer).__name__} cache "
                "(linear attention, shared or indexed KV), which kvtier does not tier"
            )
    return windows


def kv_shape(config: PreTrainedConfig) -> KVShape:
    """The tiered layers, KV heads and head dim a config describes (no weights needed).

    The head dim is the config's `head_dim`, else hidden_size / num_attention_heads, as HF's
    attention layers take it; a running cache reads both from the K/V tensors instead.
    """
    model_type = getattr(config, "model_type", type(config).__name__)
    text = text_config(config)
    heads = int(text.num_attention_heads)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    windows = sliding_windows(text, model_type)
    return KVShape(model_type, tuple(windows), int(kv_heads), int(head_dim))
