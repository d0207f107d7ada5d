"""kvtier's attention for HF models: SDPA that reads "no mask" as causal aligned to the last key.

HF builds no mask when a mask would be plain causal; its SDPA then assumes the query block starts
at key 0. A prefill chunk after a cached past starts later, so HF materializes a [chunk, past +
chunk] mask and runs a slower kernel. Registered as "kvtier" for both HF interfaces, the mask
function returns None for plain causal masks (no padding, no window) and the attention attends
over the whole past without a mask and causally within the chunk, merged by log-sum-exp; on
CUDA a chunk runs cuDNN or flash, whichever pays for this shape (`_kernel_order`), and a decode
step flash (`decode_attention`: no cuDNN plan per key length). Every other case goes to HF's
own SDPA functions unchanged. It only computes; it never moves KV.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

log = logging.getLogger(__name__)

NAME = "kvtier"
_USERS = "_kvtier_attention_users"  # per model: caches that switched it to NAME
_PREVIOUS = "_kvtier_attention_previous"


def install(model: torch.nn.Module) -> bool:
    """Switch a model that runs HF's SDPA to kvtier's attention; True if it now runs it.

    Counted per model, so several caches may share it; `uninstall` restores SDPA after the last.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        setattr(model, _USERS, getattr(model, _USERS, 0) + 1)
        return True
    if current != "sdpa":
        return False  # eager, flash, flex...: the user's choice, and update() serves them all
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
    config._attn_implementation = NAME
    setattr(model, _PREVIOUS, current)
    setattr(model, _USERS, 1)
    log.debug("%s now runs kvtier attention (was %s)", type(model).__name__, current)
    return True


def uninstall(model: torch.nn.Module) -> None:
    """Undo one `install` that returned True."""
    users = getattr(model, _USERS, 0) - 1
    setattr(model, _USERS, max(users, 0))
    if users <= 0 and getattr(model.config, "_attn_implementation", None) == NAME:
        model.config._attn_implementation = getattr(model, _PREVIOUS, "sdpa")


def mask(**kwargs: Any) -> torch.Tensor | None:
    """HF's SDPA mask, except None for a plain causal mask without padding (any offset)."""
    padding = kwargs.get("attention_mask")
    plain = (
        kwargs.get("mask_function") is causal_mask_function
        and kwargs.get("local_size") is None
        and kwargs.get("allow_is_causal_skip", True)
        and (padding is None or bool(padding.all()))
    )
    return None if plain else sdpa_mask(**kwargs)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An HF attention function: `query` [b, heads, q, d], `key`/`value` [b, kv_heads, k, d]."""
    q_length, kv_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    special = dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap")
    if (
        q_length == 1
        and attention_mask is None
        and not special
        and not kwargs.get("output_attentions")
        and key.shape[-1] == value.shape[-1] <= 256
    ):
        # decode: what HF's SDPA computes for one query and no mask (it reads no other keyword:
        # position_ids, use_cache, ... pass through), without its checks per layer
        return decode_attention(query, key, value, scale=scaling).transpose(1, 2).contiguous(), None
    if attention_mask is not None or not causal or special or not 1 < q_length < kv_length:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        layers = getattr(getattr(module, "config", None), "num_hidden_layers", 1)
        output = chunk_attention(query, key, value, scale=scale, layers=layers)
    else:  # no fused kernel to win (CPU, fp32): HF's own masked path, rounding as HF rounds
        output = masked_attention(query, key, value, scale=scale)
    return output.transpose(1, 2).contiguous(), None


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None
) -> torch.Tensor:
    """One query per sequence against all its keys, no mask; [b, heads, 1, d].

    On CUDA in half precision this calls flash attention itself (grouped heads natively).
    SDPA would pick cuDNN on Hopper, and cuDNN builds an execution plan for every new key
    length, so every decode step: tens of milliseconds a step that a repeated benchmark of the
    same lengths never shows (docs/design.md, departure 22). Elsewhere, or where flash declines
    the inputs, SDPA as HF calls it."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        # the signature is built only once flash has refused something (a per-layer cost)
        if not _FLASH_DECLINED or _decode_signature(query, key) not in _FLASH_DECLINED:
            try:
                return torch.ops.aten._scaled_dot_product_flash_attention(
                    query, key, value, 0.0, False, False, scale=scale
                )[0]
            except RuntimeError as error:  # an old GPU, an odd head size: SDPA from now on
                signature = _decode_signature(query, key)
                _FLASH_DECLINED.add(signature)
                log.debug("flash attention declined decode inputs %s: %s", signature, error)
    return sdpa_decode(query, key, value, scale=scale)


def sdpa_decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None
) -> torch.Tensor:
    """Decode attention through SDPA, grouped heads as HF passes them (cuDNN on Hopper)."""
    groups = query.shape[1] != key.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, scale=scale, enable_gqa=groups
    )


def _decode_signature(query: torch.Tensor, key: torch.Tensor) -> tuple:
    return (query.device, query.dtype, query.shape[-1], query.shape[1], key.shape[1])


_FLASH_DECLINED: set[tuple] = set()  # decode input signatures flash refused once


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """The same causal attention as `chunk_attention` through SDPA with a materialized mask and
    repeated K/V heads (what HF does for a chunk)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    value = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    q_length, kv_length = query.shape[2], key.shape[2]
    allowed = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed.tril(kv_length - q_length), scale=scale
    )


def chunk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float,
    layers: int = 1,
) -> torch.Tensor:
    """Causal attention of `q` queries that are the last `q` of `k` keys: every query sees the
    first `k - q` keys (no mask) and the chunk's own keys up to itself. Returns [b, heads, q, d].
    `layers`: how many calls of this shape one forward makes (the model's layers), for the
    choice of kernel (`_kernel_order`).
    """
    q_length, kv_length = query.shape[2], key.shape[2]
    past = kv_length - q_length
    past_out, past_lse = _past_part(query, key[:, :, :past], value[:, :, :past], scale, layers)
    own_out, own_lse = _own_part(query, key[:, :, past:], value[:, :, past:], scale, layers)
    wide = _wide(query)
    past_lse, own_lse = past_lse.to(wide), own_lse.to(wide)
    top = torch.maximum(past_lse, own_lse)
    past_weight = torch.exp(past_lse - top).unsqueeze(-1)
    own_weight = torch.exp(own_lse - top).unsqueeze(-1)
    merged = (past_out.to(wide) * past_weight + own_out.to(wide) * own_weight) / (
        past_weight + own_weight
    )
    return merged.to(query.dtype)


def _wide(query: torch.Tensor) -> torch.dtype:
    """The dtype the merge and the math path compute in: float64 for fp32 off the GPU (so the
    split adds no rounding of its own to what a one-shot SDPA gives), else float32."""
    return torch.float64 if query.dtype == torch.float32 and not query.is_cuda else torch.float32


def _past_part(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, layers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries against past keys, no mask; (out [b, heads, q, d], lse [b, heads, q] float32).

    Grouped-query heads are folded into the query length ([b, kv_heads, groups * q, d]), so
    the keys are read as they are, never repeated."""
    batch, heads, q_length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    folded = query.reshape(batch, kv_heads, groups * q_length, dim)
    out, lse = _attend_lse(folded, key, value, scale, causal=False, layers=layers)
    return out.reshape(batch, heads, q_length, -1), lse.reshape(batch, heads, q_length)


def _own_part(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, layers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries against the chunk's own keys, causal (a square: HF's top-left alignment holds)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # the square is small: repeat its keys rather than fold causal rows
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    return _attend_lse(query, key, value, scale, causal=True, layers=layers)


def _attend_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    layers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp, equal head counts: a fused kernel on CUDA (cuDNN or
    flash, `_kernel_order`), plain math elsewhere or when no kernel takes these inputs."""
    if query.is_cuda:
        for kernel in _kernel_order(query, key, value, causal, layers):
            try:
                out, lse = kernel(query, key, value, scale, causal)
            except Exception as error:  # noqa: BLE001 - a kernel refusing inputs: try the next
                log.debug("attention kernel %s declined: %s", kernel.__name__, error)
                continue
            return out, lse.reshape(query.shape[:3]).float()
    return _math(query, key, value, scale, causal)


# cuDNN builds an execution plan on its first call of each shape (H200: 72-80 ms, 1.24 s for the
# process's first; flash none) and then runs 1.7-1.9x faster than flash (580-650 TFLOP/s against
# 320-360 on chunks against a 29K past; docs/results/h200/attention_first_shape.json)
PLAN_S = 0.075
FLASH_EXTRA_S_PER_FLOP = 1 / 340e12 - 1 / 620e12
_SHAPE_CALLS: dict[tuple, int] = {}  # calls per attention shape in this process
_SHAPES_KEPT = 4096  # forget the counts past this many shapes (a long, varied process)


def _kernel_order(query, key, value, causal: bool, layers: int) -> tuple:
    """cuDNN first for a shape whose plan pays: one seen in an earlier forward (more calls than
    the `layers` one forward makes: it recurs, as chunks at the same past lengths do) or one big
    enough that a forward on flash loses more than a plan costs; else flash first. A prompt of a
    new length, a reused prefix's tail and a process's first prompt then build no plan for
    shapes that may never come back."""
    signature = (
        query.shape,
        query.stride(),
        key.shape,
        key.stride(),
        value.stride(),
        causal,
        query.dtype,
    )
    if len(_SHAPE_CALLS) >= _SHAPES_KEPT and signature not in _SHAPE_CALLS:
        _SHAPE_CALLS.clear()
    calls = _SHAPE_CALLS[signature] = _SHAPE_CALLS.get(signature, 0) + 1
    batch, heads, q_length, dim = query.shape
    flops = 4 * batch * heads * q_length * key.shape[2] * dim // (2 if causal else 1)
    if calls > layers or flops * layers * FLASH_EXTRA_S_PER_FLOP > PLAN_S:
        return _cudnn, _flash
    return _flash, _cudnn


def _cudnn(query, key, value, scale, causal):
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, causal, False, scale=scale
    )
    return result[0], result[1]


def _flash(query, key, value, scale, causal):
    result = torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, 0.0, causal, False, scale=scale
    )
    return result[0], result[1]


def _math(query, key, value, scale, causal):
    wide = _wide(query)
    scores = torch.matmul(query.to(wide), key.to(wide).transpose(-1, -2)) * scale
    if causal:
        rows, cols = scores.shape[-2:]
        allowed = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(weights, value.to(wide)), lse
