"""kvtier's attention: the chunk-after-past causal split equals plain causal attention, the mask
function skips only plain causal masks, and a model running SDPA runs it inside a TieredCache."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_same_generation, random_prompt, reference_generate, tiered_generate
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

import kvtier
from kvtier.hf import attention


def _reference(query, key, value, scale):
    """Bottom-right causal attention with an explicit mask and repeated K/V heads."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    q_length, kv_length = query.shape[2], key.shape[2]
    allowed = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device)
    allowed = allowed.tril(kv_length - q_length)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=allowed, scale=scale
    )


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 4),
    q_length=st.integers(2, 9),
    past=st.integers(1, 20),
    dim=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_chunk_attention_is_causal_attention(batch, kv_heads, groups, q_length, past, dim, seed):
    """Scenario: past keys unmasked + the chunk's square causal, merged by log-sum-exp, equals
    one causal attention aligned to the last key (fp32, 1e-5)."""
    generator = torch.Generator().manual_seed(seed)
    heads = kv_heads * groups
    query = torch.randn(batch, heads, q_length, dim, generator=generator)
    key = torch.randn(batch, kv_heads, past + q_length, dim, generator=generator)
    value = torch.randn(batch, kv_heads, past + q_length, dim, generator=generator)
    scale = dim**-0.5
    got = attention.chunk_attention(query, key, value, scale=scale)
    assert torch.allclose(got, _reference(query, key, value, scale), atol=1e-5, rtol=0)


def test_chunk_attention_reads_strided_token_major_views():
    """Scenario: K and V as kvtier hands them out (strided views of a token-major buffer)."""
    buffer = torch.randn(30, 2, 1, 2, 8)  # [tokens, K/V, batch, kv_heads, head_dim]
    key = buffer[:, 0].permute(1, 2, 0, 3)
    value = buffer[:, 1].permute(1, 2, 0, 3)
    query = torch.randn(1, 4, 6, 8)
    got = attention.chunk_attention(query, key, value, scale=0.3)
    want = _reference(query, key.contiguous(), value.contiguous(), 0.3)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def _mask_args(**overrides: Any) -> dict[str, Any]:
    args = {
        "batch_size": 1,
        "q_length": 4,
        "kv_length": 10,
        "q_offset": 6,
        "kv_offset": 0,
        "mask_function": causal_mask_function,
        "attention_mask": torch.ones(1, 10, dtype=torch.bool),
        "allow_is_causal_skip": True,
        "device": "cpu",
    }
    return args | overrides


def test_mask_is_none_only_for_plain_causal():
    """Scenario: no padding and no window: no mask (the attention aligns causality to the last
    key); padding, a sliding window or a refused skip: HF's own SDPA mask."""
    assert attention.mask(**_mask_args()) is None
    assert attention.mask(**_mask_args(attention_mask=None)) is None
    padded = torch.ones(1, 10, dtype=torch.bool)
    padded[0, 0] = False
    assert attention.mask(**_mask_args(attention_mask=padded)) is not None
    window = sliding_window_causal_mask_function(3)
    assert attention.mask(**_mask_args(mask_function=window, local_size=3)) is not None
    assert attention.mask(**_mask_args(allow_is_causal_skip=False)) is not None


def test_decode_steps_of_generate_take_the_direct_sdpa_call(tiny_model: Any) -> None:
    """Scenario: the decode steps of generate() (one query, no mask, HF's keywords such as
    position_ids and use_cache) skip HF's SDPA wrapper and call the kernel once, giving its
    output exactly; a keyword that changes attention (dropout) still goes through HF."""
    model, _ = tiny_model("llama", attn_implementation="sdpa")
    prompt = random_prompt(40, seed=5)
    calls: list[bool] = []
    original = attention.sdpa_attention_forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1].shape[2] == 1)  # a one-query call that reached HF's wrapper
        return original(*args, **kwargs)

    expected = reference_generate(model, prompt, max_new_tokens=6)
    attention.sdpa_attention_forward = spy
    try:
        got, _ = tiered_generate(model, kvtier.load_config(None), prompt, max_new_tokens=6)
    finally:
        attention.sdpa_attention_forward = original
    assert calls and not any(calls), "decode steps went through HF's SDPA wrapper"  # prefill did
    assert_same_generation(expected, got)

    module = model.model.layers[0].self_attn
    query, key = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16)
    value = torch.randn(1, 2, 9, 16)
    keywords = {"position_ids": torch.tensor([[8]]), "use_cache": True}
    direct, _ = attention.attention(module, query, key, value, None, scaling=0.25, **keywords)
    hf, _ = original(module, query, key, value, None, scaling=0.25, **keywords)
    assert torch.equal(direct, hf)
    calls.clear()
    attention.sdpa_attention_forward = spy
    try:
        attention.attention(module, query, key, value, None, dropout=0.5, scaling=0.25)
    finally:
        attention.sdpa_attention_forward = original
    assert calls == [True], "dropout went through HF's SDPA"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3"])
def test_sdpa_model_runs_kvtier_attention_in_a_tiered_cache(
    kind: str, tiny_model: Any, tmp_path: Any
) -> None:
    """Scenario: a model on HF's SDPA runs kvtier attention while a TieredCache is installed (a
    64-token prefill chunking of a 300-token prompt), matches DynamicCache with SDPA in one
    shot, and is back on SDPA once the cache closes."""
    model, config = tiny_model(kind, attn_implementation="sdpa")
    prompt = random_prompt(300, seed=31)
    cfg = kvtier.load_config(
        None,
        block_tokens=16,
        prefill_chunk_tokens=64,
        gpu_budget="64MiB",
        host_budget="64MiB",
        disk_budget=0,
        disk_path=str(tmp_path / "store"),
    )
    expected = reference_generate(model, prompt, max_new_tokens=12)
    seen = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(model.config._attn_implementation)
        return original(*args, **kwargs)

    original = attention.masked_attention  # what kvtier attention runs for a chunk on the CPU
    attention.masked_attention = spy
    try:
        got, _ = tiered_generate(model, cfg, prompt, max_new_tokens=12)
    finally:
        attention.masked_attention = original
    assert_same_generation(expected, got)
    assert seen and set(seen) == {"kvtier"}, "chunks after the first ran kvtier attention"
    assert model.config._attn_implementation == "sdpa"


def test_two_caches_share_the_switch(tiny_model: Any) -> None:
    """Scenario: two caches on one SDPA model: closing the first keeps kvtier attention for the
    second; closing the second restores SDPA; an eager model is never switched."""
    model, _ = tiny_model("llama", attn_implementation="sdpa")
    first, second = kvtier.TieredCache(model), kvtier.TieredCache(model)
    assert model.config._attn_implementation == "kvtier"
    first.close()
    assert model.config._attn_implementation == "kvtier"
    second.close()
    assert model.config._attn_implementation == "sdpa"
    eager, _ = tiny_model("llama")
    kvtier.TieredCache(eager).close()
    assert eager.config._attn_implementation == "eager"


def _shape(*size: int) -> torch.Tensor:
    return torch.empty(size, device="meta")


def test_kernel_order_plans_shapes_that_recur_or_pay():
    """Scenario: a chunk shape on its first forward (as many calls as layers) runs flash first
    (no cuDNN plan for a shape that may not come back); from its next forward on, cuDNN first;
    a shape big enough that flash would lose more than a plan costs takes cuDNN at once."""
    attention._SHAPE_CALLS.clear()
    query, key = _shape(1, 8, 4 * 3328, 128), _shape(1, 8, 29440, 128)  # a reused prefix's tail
    orders = [attention._kernel_order(query, key, key, False, 32) for _ in range(33)]
    assert orders[:32] == [(attention._flash, attention._cudnn)] * 32
    assert orders[32] == (attention._cudnn, attention._flash)
    big = _shape(1, 8, 4 * 4096, 128), _shape(1, 8, 512 * 1024, 128)  # a chunk at 512K
    assert attention._kernel_order(*big, big[1], False, 32) == (attention._cudnn, attention._flash)
    own = _shape(1, 32, 4096, 128)  # a chunk's own causal square: small, flash first
    assert attention._kernel_order(own, own, own, True, 32)[0] is attention._flash
    attention._SHAPE_CALLS.clear()


@pytest.mark.gpu
@pytest.mark.parametrize("first", ["_cudnn", "_flash"])
@pytest.mark.parametrize("past", [512, 5000])
def test_chunk_attention_kernels_on_gpu(past: int, first: str, monkeypatch) -> None:
    """Scenario: on CUDA the split runs fused kernels (cuDNN or flash, with log-sum-exp, either
    first) on kvtier's strided token-major K/V within bf16 noise of plain causal attention."""
    kernels = (attention._cudnn, attention._flash)
    order = kernels if first == "_cudnn" else kernels[::-1]
    monkeypatch.setattr(attention, "_kernel_order", lambda *args: order)
    generator = torch.Generator(device="cuda").manual_seed(past)
    chunk, heads, kv_heads, dim = 256, 8, 2, 64
    buffer = torch.randn(
        past + chunk, 2, 1, kv_heads, dim, device="cuda", dtype=torch.bfloat16, generator=generator
    )
    key, value = buffer[:, 0].permute(1, 2, 0, 3), buffer[:, 1].permute(1, 2, 0, 3)
    query = torch.randn(
        1, heads, chunk, dim, device="cuda", dtype=torch.bfloat16, generator=generator
    )
    got = attention.chunk_attention(query, key, value, scale=dim**-0.5).float()
    want = _reference(query.float(), key.float(), value.float(), dim**-0.5)
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_decode_attention_is_attention_over_every_key():
    """Scenario: one query per sequence (decode), grouped heads, kvtier's strided token-major
    K/V on the CPU: equals attention with repeated heads over all keys (fp32, 1e-5)."""
    buffer = torch.randn(40, 2, 2, 2, 8)  # [tokens, K/V, batch, kv_heads, head_dim]
    key, value = buffer[:, 0].permute(1, 2, 0, 3), buffer[:, 1].permute(1, 2, 0, 3)
    query = torch.randn(2, 6, 1, 8)
    got = attention.decode_attention(query, key, value, scale=0.3)
    assert torch.allclose(got, _reference(query, key, value, 0.3), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_attention_runs_flash_on_gpu(dtype: torch.dtype) -> None:
    """Scenario: decode on CUDA in half precision: flash attention called directly on strided
    token-major K/V with grouped heads (not declined), within half-precision noise of fp32."""
    generator = torch.Generator(device="cuda").manual_seed(7)
    buffer = torch.randn(
        5000, 2, 2, 2, 128, device="cuda", dtype=dtype, generator=generator
    )  # a batch of 2, 2 KV heads
    key, value = buffer[:, 0].permute(1, 2, 0, 3), buffer[:, 1].permute(1, 2, 0, 3)
    query = torch.randn(2, 8, 1, 128, device="cuda", dtype=dtype, generator=generator)
    got = attention.decode_attention(query, key, value, scale=None).float()
    want = _reference(query.float(), key.float(), value.float(), 128**-0.5)
    assert ((got - want).norm() / want.norm()).item() < 1e-2
    assert (query.device, dtype, 128, 8, 2) not in attention._FLASH_DECLINED


@pytest.mark.gpu
def test_sdpa_model_on_gpu_matches_dynamic_cache(tiny_model: Any, tmp_path: Any) -> None:
    """Scenario: an SDPA model on CUDA (fp32) through a TieredCache: chunked prefill on kvtier
    attention, greedy tokens equal DynamicCache's."""
    import copy

    model, _ = tiny_model("llama", attn_implementation="sdpa")
    model = copy.deepcopy(model).cuda()
    prompt = random_prompt(300, seed=32).cuda()
    cfg = kvtier.load_config(
        None,
        block_tokens=16,
        prefill_chunk_tokens=64,
        disk_budget=0,
        disk_path=str(tmp_path / "store"),
        gpu_budget="64MiB",
        host_budget="64MiB",
    )
    expected = reference_generate(model, prompt, max_new_tokens=12)
    got, _ = tiered_generate(model, cfg, prompt, max_new_tokens=12)
    assert torch.equal(expected.sequences, got.sequences)
