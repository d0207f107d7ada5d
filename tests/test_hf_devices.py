"""A model dispatched with accelerate's device_map, run through kvtier: token-exact vs DynamicCache.

On a CPU: accelerate's AlignDevicesHook on every layer (all-cpu map, hooks forced), layers
offloaded to "disk" (their weights on the meta device), and the layers spread over fake CPU
devices (`torch.device("cpu", i)`, injected where kvtier reads a layer's device). On CUDA (marked
gpu): layers on cuda:0 and offloaded to the CPU, and a split over two GPUs.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
from conftest import (
    PREFETCH_DEPTH,
    assert_all_tiers_used,
    assert_same_generation,
    geometry,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
    tiny_config,
)
from transformers import AutoModelForCausalLM

import kvtier
from kvtier.blocks import Tier
from kvtier.hf import models
from kvtier.layout import device_staging_bytes

PROMPT = 300  # 20 blocks of 16: two or three on the GPU, seven on host, the rest on disk
NEW = 16
LAYERS = 6  # three per device: more than the staging buffers, or a device never streams


def _fresh_model() -> torch.nn.Module:
    """A tiny llama of its own: dispatching changes the model in place (hooks, meta weights)."""
    torch.manual_seed(0)
    config = tiny_config("llama", num_hidden_layers=LAYERS)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _device_map(layer_devices: list[object], *, head: object) -> dict[str, object]:
    """An accelerate device map: embeddings with layer 0, norm and lm_head on `head`."""
    mapping: dict[str, object] = {"model.embed_tokens": layer_devices[0]}
    mapping |= {f"model.layers.{i}": device for i, device in enumerate(layer_devices)}
    return mapping | {"model.norm": head, "model.rotary_emb": head, "lm_head": head}


def _run(model, tmp_path, *, device="cpu", **overrides):
    prompt = random_prompt(PROMPT).to(device)
    expected = reference_generate(model, prompt, max_new_tokens=NEW)
    cfg = tiered_config(model.config, tmp_path, PROMPT + NEW, **overrides)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW)
    return expected, got, stats


def test_accelerate_hooks_on_every_layer(tmp_path):
    """Scenario: dispatch_model with an all-cpu map and force_hooks: every layer's forward runs
    through accelerate's AlignDevicesHook and kvtier's hooks together."""
    model = _fresh_model()
    dispatch_model(model, _device_map(["cpu"] * LAYERS, head="cpu"), force_hooks=True)
    assert all(hasattr(layer, "_hf_hook") for layer in model.model.layers)
    expected, got, stats = _run(model, tmp_path)
    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


def test_layers_offloaded_to_disk_keep_their_execution_device(tmp_path):
    """Scenario: layers mapped to "disk" have meta weights; kvtier put their GPU tier on the meta
    device and generate() crashed, until the device came from the accelerate hook."""
    model = _fresh_model()
    layer_map = ["cpu", "disk", "cpu", "disk", "disk", "cpu"]
    dispatch_model(model, _device_map(layer_map, head="cpu"), offload_dir=tmp_path / "offload")
    offloaded = model.model.layers[1]
    assert next(offloaded.parameters()).device.type == "meta"
    assert models.execution_device(offloaded) == torch.device("cpu")
    expected, got, stats = _run(model, tmp_path / "store", disk_model_key="tiny-offloaded")
    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


def test_layers_on_two_fake_devices_with_their_own_budgets(tmp_path, monkeypatch):
    """Scenario: layers 0-2 on "cpu", 3-5 on "cpu:1" (names kvtier treats as two devices), cpu:1
    with one slot's [gpu.devices] budget; generate() through every tier is token-exact."""
    model = _fresh_model()
    layers = list(model.model.layers)
    fake = [torch.device("cpu")] * 3 + [torch.device("cpu", 1)] * 3
    monkeypatch.setattr(models, "execution_device", lambda layer: fake[layers.index(layer)])
    kv = geometry(model.config)
    buffers = PREFETCH_DEPTH + 1
    cpu1 = device_staging_bytes(kv, PROMPT + NEW, buffers=buffers) + 3 * kv.layer_block_bytes
    prompt = random_prompt(PROMPT)
    expected = reference_generate(model, prompt, max_new_tokens=NEW)
    cfg = tiered_config(model.config, tmp_path, PROMPT + NEW, gpu={"devices": {"cpu:1": cpu1}})
    cache = kvtier.TieredCache(model, cfg)
    try:
        got = reference_generate(model, prompt, cache=cache, max_new_tokens=NEW)
        ctl = cache.controller
        assert ctl.geometry.layer_devices == tuple(fake)
        assert ctl.placement.device_budgets == {fake[0]: cfg.gpu.budget_bytes, fake[3]: cpu1}
        ctl.check_invariants()
        stats = cache.stats()
    finally:
        cache.close()
    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)
    assert stats["gpu"]["budget_bytes"] == cfg.gpu.budget_bytes + cpu1


@pytest.mark.gpu
def test_cuda0_with_layers_offloaded_to_cpu(tmp_path):
    """Scenario: embed_tokens and layers 0-2 on cuda:0, layers 3-5 offloaded to the CPU (accelerate
    runs them on cuda:0 with weights streamed in): fp32 tokens and logits equal DynamicCache's."""
    model = _fresh_model()
    layer_map = ["cuda:0"] * 3 + ["cpu"] * 3
    dispatch_model(model, _device_map(layer_map, head="cuda:0"))
    assert models.execution_device(model.model.layers[5]) == torch.device("cuda", 0)
    expected, got, stats = _run(model, tmp_path, device="cuda:0", disk_model_key="tiny-cpu-offload")
    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_split_layers(tmp_path):
    """Scenario: layers 0-2 on cuda:0, 3-5 (and lm_head) on cuda:1: each layer's slots and
    staging on its own GPU, both GPUs within their budget, tokens and logits exact."""
    model = _fresh_model()
    layer_map = ["cuda:0"] * 3 + ["cuda:1"] * 3
    dispatch_model(model, _device_map(layer_map, head="cuda:1"))
    prompt = random_prompt(PROMPT).to("cuda:0")
    expected = reference_generate(model, prompt, max_new_tokens=NEW)
    cfg = tiered_config(model.config, tmp_path, PROMPT + NEW)
    cache = kvtier.TieredCache(model, cfg)
    try:
        got = reference_generate(model, prompt, cache=cache, max_new_tokens=NEW)
        ctl = cache.controller
        assert ctl.geometry.devices == (torch.device("cuda", 0), torch.device("cuda", 1))
        ctl.check_invariants()
        gpu = ctl.stores[Tier.GPU]
        for layer, device in enumerate(ctl.geometry.layer_devices):
            assert ctl.staging.buffer(layer).device == device
            assert gpu.source(0, layer).device == device
        stats = cache.stats()
    finally:
        cache.close()
    assert_same_generation(expected, got)
    assert_all_tiers_used(stats)
