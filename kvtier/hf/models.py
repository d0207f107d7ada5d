"""Model introspection: which decoder layers are tiered, where they live, and the fingerprint.

Refuses, with UnsupportedModelError naming the model type, any architecture whose cache layout
kvtier does not understand, before a single token is generated.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.blocks import FORMAT_VERSION
from kvtier.errors import UnsupportedModelError
from kvtier.hf.shape import sliding_windows, text_config
from kvtier.layout import KVGeometry

log = logging.getLogger(__name__)


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


def describe(model: torch.nn.Module, *, model_key: str = "") -> ModelSpec:
    """Inspect a causal LM; raises UnsupportedModelError for layouts kvtier cannot tier."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no HF config; pass a HF model")
    text = text_config(config)
    layers = _decoder_layers(model, model_type)
    windows = sliding_windows(text, model_type)
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
    devices = tuple(execution_device(layer) for layer in layers)
    identity = fingerprint(model, model_key=model_key)
    return ModelSpec(model_type, tuple(layers), tuple(windows), devices, identity)


def fingerprint(model: torch.nn.Module, *, model_key: str = "") -> str:
    """Identity of the model's KV: config JSON, dtype, FORMAT_VERSION and every weight's bits.

    Every element of every parameter and buffer takes part, through an exact integer checksum
    computed on the tensor's device (`_weights_digest`; 0.18 s for Llama-3-8B shapes in bf16
    on an H200, scripts/bench_fingerprint.py), so models that differ in one bit of one weight
    never share blocks. `model_key` (`disk.model_key`, e.g. "org/model@rev") names
    the weights instead and skips the checksum. Cached on the model until a parameter changes
    in place or is replaced (its version counter or storage) or a sample of its elements
    changes (`_tripwire`: an edit through `.data`, which no version counter sees, such as a
    merged LoRA or a rescaled matrix); an edit through `.data` of elements outside the sample
    is not seen: pass a new `model_key` or use a new model object then.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    stamp = (
        model_key,
        tuple((name, t.data_ptr(), t._version) for name, t in tensors),
        _tripwire(tensors),
    )
    cached = getattr(model, "_kvtier_fingerprint", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _UNSHAPING_CONFIG}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(f"\0{getattr(model, 'dtype', '')}\0{FORMAT_VERSION}\0".encode())
    if model_key:
        h.update(b"key:" + model_key.encode())
    else:
        h.update(b"weights:" + _weights_digest(tensors))
    digest = h.hexdigest()[:32]
    try:
        model._kvtier_fingerprint = (stamp, digest)
    except AttributeError:
        pass
    return digest


# config keys that name where a model came from or how it was loaded, not what it computes
_UNSHAPING_CONFIG = frozenset({"_name_or_path", "_commit_hash", "dtype", "torch_dtype"})
_ROW = 1 << 16  # words per checksum row
_ROWS_PER_PASS = 64  # rows converted at once: bounds the float64 temporary to 32 MiB
_LANES = 4  # independent multiplier columns


_SAMPLE = 1024  # elements of each tensor the cached fingerprint's tripwire reads


def _tripwire(tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """Two sums over `_SAMPLE` evenly spaced elements of each tensor (plain and position
    weighted, in float64), read back in one copy per device. It runs on every lookup of the
    cached fingerprint: 16 ms against 0.11 s for the full checksum of the 8B shape's 291
    tensors on an H200 (scripts/bench_fingerprint.py, measured with the position weights made
    per tensor; they are made once per device now), 4.7-5.1 ms against 0.25-0.70 s for the
    SmolLM2-135M shape on the 2-core CPU box (`--shape 135m --device cpu`)."""
    sums: dict[torch.device, list[torch.Tensor]] = {}
    weights: dict[torch.device, torch.Tensor] = {}
    for _, tensor in tensors:
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        if tensor.device not in weights:
            weights[tensor.device] = torch.arange(
                1, _SAMPLE + 1, device=tensor.device, dtype=torch.float64
            )
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].to(torch.float64)
        positions = weights[tensor.device][: sample.numel()]
        sums.setdefault(tensor.device, []).append(torch.stack([sample.sum(), sample @ positions]))
    return b"".join(torch.cat(parts).cpu().numpy().tobytes() for parts in sums.values())


def _weights_digest(tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """sha256 over each tensor's name, dtype, shape and exact row checksums of its bits.

    A tensor's bytes are read as int16 words (uint8 for odd byte counts), cut into rows of
    `_ROW` words, and each row multiplied (one float64 matmul, on the tensor's device) by
    `_LANES` fixed pseudo-random integer columns in [1, 2**21). Every product and partial sum
    is an integer below 2**52, so the float64 result is exact and the same in any summation
    order, on any device. Changing one word changes its row's sums by change * multiplier,
    never 0: one flipped bit anywhere shows. Unrelated changes cancel with probability below
    2**-21 per lane (2**-84 for all four).
    """
    h = hashlib.sha256()
    columns: dict[torch.device, torch.Tensor] = {}
    for name, tensor in tensors:
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.device.type == "meta":
            raise UnsupportedModelError(
                f"parameter {name} is on the meta device (offloaded?), so its weights cannot be "
                "checksummed; set disk.model_key to name the model (e.g. 'org/model@revision')"
            )
        if tensor.device not in columns:
            columns[tensor.device] = _multipliers().to(tensor.device)
        sums = _row_sums(tensor.detach(), columns[tensor.device])
        h.update(sums.to(torch.int64).cpu().numpy().tobytes())
    return h.digest()


def _multipliers() -> torch.Tensor:
    """[_ROW, _LANES] float64 integers in [1, 2**21), the same everywhere (shake_256 of a label)."""
    raw = hashlib.shake_256(b"kvtier fingerprint multipliers v1").digest(4 * _ROW * _LANES)
    words = np.frombuffer(raw, dtype="<u4") & 0x1FFFFF
    return torch.from_numpy(np.maximum(words, 1).astype(np.float64)).reshape(_ROW, _LANES)


def _row_sums(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[rows, _LANES] float64: each row of the tensor's words times the multiplier columns."""
    words = tensor.contiguous().reshape(-1).view(torch.uint8)
    if words.numel() % 2 == 0:
        words = words.view(torch.int16)
    sums = [torch.zeros((0, _LANES), dtype=torch.float64, device=tensor.device)]
    for start in range(0, words.numel(), _ROW * _ROWS_PER_PASS):
        chunk = words[start : start + _ROW * _ROWS_PER_PASS].to(torch.float64)
        full, tail = divmod(chunk.numel(), _ROW)
        if full:
            sums.append(chunk[: full * _ROW].view(full, _ROW) @ columns)
        if tail:
            sums.append(chunk[full * _ROW :].view(1, tail) @ columns[:tail])
    return torch.cat(sums)


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


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a decoder layer computes, so where its K/V arrive: the one place kvtier decides a
    layer's device (the GPU tier of that layer lives there).

    An accelerate hook's `execution_device` wins (on the layer, else on its first hooked
    submodule): with `device_map` entries "cpu" or "disk" the weights sit on the meta device and
    are brought to the execution device per call. Else the first parameter that is not on the
    meta device; the CPU when there is none.
    """
    for part in module.modules():
        device = _hook_device(getattr(part, "_hf_hook", None))
        if device is not None:
            return device
    for param in module.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def _hook_device(hook: object) -> torch.device | None:
    """An accelerate hook's execution device (a SequentialHook's first that has one), or None."""
    if hook is None:
        return None
    for inner in getattr(hook, "hooks", None) or (hook,):
        device = getattr(inner, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def estimated_geometry(
    spec: ModelSpec, config: object, *, batch: int, dtype: torch.dtype, block_tokens: int
) -> KVGeometry:
    """The KV geometry a model's config implies, before any layer ran (the cache then takes the
    real one from the first K/V it sees)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return KVGeometry(
        layer_ids=spec.tiered_layers,
        layer_devices=tuple(spec.layer_devices[i] for i in spec.tiered_layers),
        batch=batch,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        block_tokens=block_tokens,
    )
