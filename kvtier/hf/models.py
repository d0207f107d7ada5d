"""Model introspection: which decoder layers are tiered, where they live, and the fingerprint.

Refuses, with UnsupportedModelError naming the model type, any architecture whose cache layout
kvtier does not understand, before a single token is generated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from kvtier.blocks import FORMAT_VERSION
from kvtier.errors import UnsupportedModelError

log = logging.getLogger(__name__)

_MLA_KEYS = ("kv_lora_rank", "q_lora_rank")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_type: str
    decoder_layers: tuple[torch.nn.Module, ...]
    # per decoder layer: None for a tiered (full-attention) layer, else its sliding window
    sliding_windows: tuple[int | None, ...]
    layer_devices: tuple[torch.device, ...]
    fingerprint: str

    @property
    def tiered_layers(self) -> tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.sliding_windows) if w is None)


def describe(model: torch.nn.Module) -> ModelSpec:
    """Inspect a causal LM; raises UnsupportedModelError for layouts kvtier cannot tier."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no HF config; pass a HF model")
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
    layers = _decoder_layers(model, model_type)
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
    if len(windows) != len(layers):
        raise UnsupportedModelError(
            f"model type {model_type!r}: {len(layers)} decoder layers but the config describes "
            f"{len(windows)} cache layers (KV sharing?); kvtier does not tier this layout"
        )
    if all(w is not None for w in windows):
        # a bounded cache: every layer stays on the device as HF keeps it; nothing to tier
        log.warning(
            "model type %r has only sliding-window layers (window %s); its KV is bounded and "
            "stays on the device, so kvtier tiers nothing",
            model_type,
            windows[0],
        )
    devices = tuple(_device_of(layer) for layer in layers)
    return ModelSpec(model_type, tuple(layers), tuple(windows), devices, fingerprint(model))


def fingerprint(model: torch.nn.Module) -> str:
    """Hash of config JSON, dtype, format version and a few K/V projection weight bytes.

    Computed once per model object, so two models (even two fine-tunes of one config) never
    share blocks.
    """
    cached = getattr(model, "_kvtier_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(getattr(model, "dtype", "")).encode())
    h.update(FORMAT_VERSION.encode())
    sampled = 0
    for name, param in model.named_parameters():
        if ("k_proj" in name or "v_proj" in name) and sampled < 4:
            flat = param.detach().reshape(-1)[:1024].to("cpu")
            h.update(name.encode())
            h.update(flat.view(torch.uint8).numpy().tobytes())
            sampled += 1
    digest = h.hexdigest()[:32]
    try:
        model._kvtier_fingerprint = digest
    except AttributeError:
        pass
    return digest


def _decoder_layers(model: torch.nn.Module, model_type: str) -> list[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UnsupportedModelError(
            f"model type {model_type!r}: cannot find its decoder layers (expected "
            "model.get_decoder().layers)"
        )
    return list(layers)


def _device_of(module: torch.nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")
