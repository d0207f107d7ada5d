"""Generate with a loaded model through any cache: the prompt, streamed text, timings, block map.

`kvtier run`, `demo` and `verify` generate through here. It measures and hands text and
progress to callbacks; it never prints and never picks budgets.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import (
    Cache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TextStreamer,
)

from kvtier.controller.stats import block_map as _block_map
from kvtier.errors import KVTierError

# transformers 5.24 renamed generate's `past_key_values` to `cache` (the old name still works, warning)
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"

OnText = Callable[[str], None]  # a piece of decoded text, as soon as it is final
OnPrefill = Callable[[int, int], None]  # prompt tokens done, prompt tokens in all


@dataclass(frozen=True, slots=True)
class Sampling:
    """Greedy when `temperature` is 0; else sampled with `top_p`, from `seed`."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True, slots=True)
class Generation:
    """One generate() call, measured. Times are wall-clock seconds on the host."""

    text: str  # the generated tokens decoded, special tokens skipped
    token_ids: list[int]  # the generated ids (batch row 0), prompt excluded
    prompt_tokens: int
    ttft_s: float  # generate() start to the first token's logits: the prefill
    decode_tok_s: float  # tokens after the first / their seconds (0 with one token)
    seconds: float
    peak_gpu_bytes: int | None  # torch's peak allocation during the call; None without CUDA
    peak_rss_bytes: int  # the process's peak resident memory so far
    logits: list[torch.Tensor] | None  # per generated token, [vocab] float32 (keep_logits)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the logits."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": len(self.token_ids),
            "ttft_s": round(self.ttft_s, 4),
            "prefill_tok_s": round(self.prefill_tok_s, 2),
            "decode_tok_s": round(self.decode_tok_s, 2),
            "seconds": round(self.seconds, 4),
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, *, chat: bool) -> torch.Tensor:
    """The prompt's ids `[1, tokens]`; with `chat`, the model's chat template around `text` as
    the user's message (and the assistant's turn opened)."""
    if not text.strip():
        raise KVTierError("the prompt is empty; give --prompt TEXT, --prompt-file FILE or stdin")
    if not chat:
        return tokenizer(text, return_tensors="pt")["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise KVTierError(
            f"{type(tokenizer).__name__} has no chat template; drop --chat to send the prompt as is"
        )
    messages = [{"role": "user", "content": text}]
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    *,
    cache: Cache,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    on_text: OnText | None = None,
    on_prefill: OnPrefill | None = None,
    keep_logits: bool = False,
) -> Generation:
    """model.generate() from `prompt_ids` `[1, tokens]` through `cache`, timed.

    `on_text` gets the decoded text as it is generated; `on_prefill` is called after each
    prefill chunk (kvtier splits long prompts into prefill_chunk_tokens). `keep_logits` keeps
    every step's raw logits (for `verify`)."""
    device = model.device
    prompt_ids = prompt_ids.to(device)
    clock = _StepClock()
    options = _options(sampling, tokenizer, max_new_tokens, keep_logits)
    if on_text is not None:
        options["streamer"] = _TextSink(tokenizer, on_text)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with (
        _prefill_progress(model, clock, prompt_ids.shape[1], on_prefill),
        _seeded(sampling, device),
    ):
        with torch.inference_mode():
            out = model.generate(
                prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                **{CACHE_KWARG: cache},
                logits_processor=LogitsProcessorList([clock]),
                **options,
            )
    seconds = time.perf_counter() - started
    sequences = out.sequences if keep_logits else out
    new_ids = sequences[0, prompt_ids.shape[1] :].tolist()
    first, last = (clock.times[0], clock.times[-1]) if clock.times else (started, started)
    steps = len(clock.times) - 1
    return Generation(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        token_ids=new_ids,
        prompt_tokens=prompt_ids.shape[1],
        ttft_s=first - started,
        decode_tok_s=steps / (last - first) if last > first else 0.0,
        seconds=seconds,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        peak_rss_bytes=_peak_rss_bytes(),
        logits=[step[0].float().cpu() for step in out.logits] if keep_logits else None,
    )


def _options(
    sampling: Sampling, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int, logits: bool
) -> dict[str, Any]:
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": not sampling.greedy}
    if not sampling.greedy:
        options |= {"temperature": sampling.temperature, "top_p": sampling.top_p}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        options["pad_token_id"] = pad
    if logits:
        options |= {"return_dict_in_generate": True, "output_logits": True}
    return options


def first_mismatch(expected: list[int], got: list[int]) -> int | None:
    """Index of the first differing token, or None when the lists are equal."""
    for index, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            return index
    return None if len(expected) == len(got) else min(len(expected), len(got))


def block_map(cache: Cache) -> str:
    """One character per block (stats.BLOCK_MAP_LEGEND) of a TieredCache, "" for any other
    cache or one that holds nothing."""
    controller = getattr(cache, "controller", None)
    if controller is None:
        return ""
    policy, tokens = controller.placement.policy, controller.tokens
    return _block_map(controller.table, pinned=lambda block: policy.pinned(block, tokens))


class _StepClock(LogitsProcessor):
    """Notes when each step's logits are ready; the first one marks the end of prefill."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.times.append(time.perf_counter())
        return scores


class _TextSink(TextStreamer):
    """transformers' TextStreamer, handing each finished piece of text to a callback."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: OnText) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._on_text(text)


@contextlib.contextmanager
def _prefill_progress(
    model: PreTrainedModel, clock: _StepClock, total: int, on_prefill: OnPrefill | None
) -> Iterator[None]:
    """Calls `on_prefill` after the last decoder layer of every forward before the first token."""
    layers = getattr(model.get_decoder(), "layers", None) if on_prefill else None
    if not layers:
        yield
        return
    done = [0]

    def after_layer(module: torch.nn.Module, args: tuple, output: object) -> None:
        if clock.times or not args or not isinstance(args[0], torch.Tensor):
            return  # decoding: the prompt is done
        done[0] = min(total, done[0] + args[0].shape[1])  # hidden states [batch, q, hidden]
        on_prefill(done[0], total)

    handle = layers[-1].register_forward_hook(after_layer)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _seeded(sampling: Sampling, device: torch.device) -> Iterator[None]:
    """Sampling draws from `seed` without touching the caller's random state."""
    if sampling.greedy:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(sampling.seed)
        yield


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB
