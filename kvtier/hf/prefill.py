"""Long prompts in chunks: chunk by chunk through the whole model, or layer by layer.

Chunk-major runs each chunk through every layer (HF's own order). Layer-major runs each decoder
layer over every chunk before the next layer (FlexGen's order), so a streamed layer's context
stays in its staging buffer and is written down once instead of being read back for every
chunk. It records each layer's inputs per chunk with the layers stubbed out (masks, positions,
rotary embeddings come from HF's own code), replays the layers from those, and gets HF's own
logits from a last pass whose layers return the final hidden states. Drives the cache; never
touches a tier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

_SEQ_KWARGS = ("input_ids", "inputs_embeds", "position_ids", "cache_position", "token_type_ids")
# hidden states of all chunks larger than this wait between layers in pinned host memory, not on
# the GPU (a 32K prompt of an 8B shape, 256 MiB, stays: moving it took 0.2-0.5 s of a 3 s TTFT)
GPU_HIDDEN_BYTES = 256 << 20


class PrefillDriver(Protocol):
    """What a prefill drives: the cache (TieredCache implements it)."""

    def forward_step(
        self, input_ids: torch.Tensor | None, new_tokens: int
    ) -> contextlib.AbstractContextManager[None]: ...

    def layer_major(
        self, input_ids: torch.Tensor | None, new_tokens: int
    ) -> contextlib.AbstractContextManager[None]:
        """Bracket a layer-major prefill of `new_tokens` positions (one step of the cache)."""
        ...

    def pretend_length(self, tokens: int | None) -> None:
        """Report `tokens` as the cached length (None: the real one) while layers are stubbed."""
        ...


def splittable(kwargs: dict) -> bool:
    """Whether a call can be cut into chunks: every tensor it passes is one `chunk_kwargs`
    knows how to cut (an image's `pixel_values` belongs to the chunk with its image tokens,
    and which that is only the model knows, so such a call runs whole)."""
    return all(
        name in _SEQ_KWARGS or name == "attention_mask" or not isinstance(value, torch.Tensor)
        for name, value in kwargs.items()
    )


def chunk_kwargs(kwargs: dict, start: int, end: int, total: int) -> dict:
    """The model-call keyword arguments of positions [start, end) of a `total`-long input."""
    part = dict(kwargs)
    for name in _SEQ_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            part[name] = value[..., start:end] if name != "inputs_embeds" else value[:, start:end]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        part["attention_mask"] = mask[:, : mask.shape[1] - total + end]
    return part


def chunk_major(driver: PrefillDriver, original: Callable, kwargs: dict, total: int, chunk: int):
    """Run a long input as consecutive chunks through the same cache; logits are concatenated
    when the caller asked for all of them."""
    keep = kwargs.get("logits_to_keep", 0)
    outputs, logits = None, []
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        part = chunk_kwargs(kwargs, start, end, total)
        if end < total and keep != 0:
            part["logits_to_keep"] = 1
        with driver.forward_step(part.get("input_ids"), end - start):
            outputs = original(**part)
        if keep == 0 and getattr(outputs, "logits", None) is not None:
            logits.append(outputs.logits)
    if keep == 0 and logits:
        outputs.logits = torch.cat(logits, dim=1)
    return outputs


def layer_major(
    driver: PrefillDriver,
    original: Callable,
    kwargs: dict,
    *,
    total: int,
    chunk: int,
    past: int,
    layers: tuple[torch.nn.Module, ...],
):
    """Prefill `total` positions (after `past` cached ones) layer by layer; returns the model's
    outputs for the last chunk (every chunk's logits when the caller keeps all of them)."""
    bounds = [(start, min(start + chunk, total)) for start in range(0, total, chunk)]
    parts = [chunk_kwargs(kwargs, start, end, total) for start, end in bounds]
    inputs = _record(driver, original, parts, bounds, past, layers)
    keep = kwargs.get("logits_to_keep", 0)
    with driver.layer_major(kwargs.get("input_ids"), total):
        finals, tuples = _run_layers(inputs, layers, keep_all=keep == 0)
    replay = range(len(parts)) if keep == 0 else [len(parts) - 1]
    outputs, logits = None, []
    for index in replay:
        driver.pretend_length(past + bounds[index][0])
        final = finals.get(index)
        with _stubbed(layers, lambda i, args, kw, final=final: _as_output(final, tuples)):
            outputs = original(**parts[index])
        logits.append(outputs.logits)
    driver.pretend_length(None)
    if keep == 0:
        outputs.logits = torch.cat(logits, dim=1)
    return outputs


class _Inputs:
    """Each layer's recorded call per chunk, and the hidden states between layers."""

    def __init__(self, layers: int, chunks: int) -> None:
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in range(layers)]
        self.hidden = _HiddenStore(chunks)


def _record(driver, original, parts, bounds, past, layers) -> _Inputs:
    """Run the model once per chunk with the decoder layers stubbed: record their arguments
    (masks, positions, rotary embeddings for that chunk) and layer 0's input."""
    inputs = _Inputs(len(layers), len(parts))

    def record(index: int, args: tuple, kw: dict) -> torch.Tensor:
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.calls[index].append((args[1:], kw))
        if index == 0:
            inputs.hidden.put(len(inputs.calls[0]) - 1, hidden)
        return hidden

    try:
        with _stubbed(layers, record):
            for part, (start, _) in zip(parts, bounds, strict=True):
                driver.pretend_length(past + start)
                original(**{**part, "logits_to_keep": 1})
    finally:
        driver.pretend_length(None)
    return inputs


def _run_layers(inputs: _Inputs, layers, *, keep_all: bool) -> tuple[dict[int, torch.Tensor], bool]:
    """Every layer over every chunk from the recorded inputs; the last layer's outputs (of the
    last chunk, or all with `keep_all`), and whether the layers return tuples (the replay must
    return what the model expects)."""
    finals: dict[int, torch.Tensor] = {}
    tuples = False
    chunks = len(inputs.calls[0])
    for index, layer in enumerate(layers):
        last = index == len(layers) - 1
        for position, (args, kw) in enumerate(inputs.calls[index]):
            prefetch = not (last and position == chunks - 1)
            output = layer(inputs.hidden.get(position, prefetch=prefetch), *args, **kw)
            tuples = not isinstance(output, torch.Tensor)
            hidden = output[0] if tuples else output
            if not last:
                inputs.hidden.put(position, hidden)
            elif keep_all or position == chunks - 1:
                finals[position] = hidden
    return finals, tuples


def _as_output(hidden: torch.Tensor | None, tuples: bool):
    return (hidden,) if tuples else hidden


@contextlib.contextmanager
def _stubbed(layers, stub: Callable[[int, tuple, dict], Any]) -> Iterator[None]:
    """Replace each decoder layer's forward with `stub(layer index, args, kwargs)`."""
    had = [("forward" in layer.__dict__, layer.__dict__.get("forward")) for layer in layers]
    for index, layer in enumerate(layers):
        layer.forward = lambda *args, _index=index, **kw: stub(_index, args, kw)
    try:
        yield
    finally:
        for layer, (present, forward) in zip(layers, had, strict=True):
            if present:
                layer.forward = forward
            else:
                layer.__dict__.pop("forward", None)


class _HiddenStore:
    """Hidden states of every chunk between two layers: on the GPU while small, else in pinned
    host memory. Host copies run on a side stream, each chunk's upload started while the chunk
    before it computes, so they overlap the layers' work."""

    def __init__(self, chunks: int) -> None:
        self._chunks: list[torch.Tensor | None] = [None] * chunks
        self._device: torch.device | None = None
        self._stream: torch.cuda.Stream | None = None
        self._uploads: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def put(self, index: int, hidden: torch.Tensor) -> None:
        self._device = hidden.device
        if not (hidden.is_cuda and hidden.nbytes * len(self._chunks) > GPU_HIDDEN_BYTES):
            self._chunks[index] = hidden
            return
        held = self._chunks[index]
        if held is None or held.is_cuda or held.shape != hidden.shape:
            held = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        stream = self._side_stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is computed
        with torch.cuda.stream(stream):
            held.copy_(hidden, non_blocking=True)
        hidden.record_stream(stream)  # not reused before the copy has read it
        self._chunks[index] = held
        self._uploads.pop(index, None)

    def get(self, index: int, *, prefetch: bool = True) -> torch.Tensor:
        held = self._chunks[index]
        assert held is not None, "a chunk's hidden states were never recorded"
        if held.device == self._device:
            return held
        tensor, ready = self._uploads.pop(index, None) or self._upload(index)
        current = torch.cuda.current_stream(self._device)
        current.wait_event(ready)
        tensor.record_stream(current)
        following = (index + 1) % len(self._chunks)
        if prefetch and following not in self._uploads:
            waiting = self._chunks[following]
            if waiting is not None and waiting.device != self._device:
                self._uploads[following] = self._upload(following)
        return tensor

    def _upload(self, index: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start copying chunk `index` up on the side stream (after its copy down there)."""
        stream = self._side_stream(self._device)
        with torch.cuda.stream(stream):
            tensor = self._chunks[index].to(self._device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return tensor, ready

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream
