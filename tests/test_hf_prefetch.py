"""Prefetch order while layers stream: the gather that reuses a layer's staging buffer starts as
soon as that layer's attention is queued (before the next layer begins), across the step
boundary too, and the tokens stay exact."""

from __future__ import annotations

from typing import Any

from conftest import (
    assert_same_generation,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
)

from kvtier.controller.controller import TierController

PROMPT_TOKENS = 150
NEW_TOKENS = 6


def test_gather_into_a_layers_buffer_starts_after_its_attention(
    tiny_model: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """Scenario: streamed decode, prefetch_depth 1 (two staging buffers): layer t + 2's gather
    (into layer t's buffer) is asked for between layer t's start and layer t + 1's start."""
    model, config = tiny_model("llama", attn_implementation="sdpa")
    layers = len(model.model.layers)
    prompt = random_prompt(PROMPT_TOKENS, seed=5)
    cfg = tiered_config(config, tmp_path / "store", PROMPT_TOKENS + NEW_TOKENS)
    log: list[tuple[str, int]] = []
    original = TierController.prefetch

    def recorded(self, tiered_index: int, *, next_step: bool = False) -> None:
        log.append(("prefetch", tiered_index + (layers if next_step else 0)))
        original(self, tiered_index, next_step=next_step)

    monkeypatch.setattr(TierController, "prefetch", recorded)
    handles = [
        layer.register_forward_pre_hook(lambda module, args, i=i: log.append(("enter", i)))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        expected = reference_generate(model, prompt, max_new_tokens=NEW_TOKENS)
        log.clear()  # the reference run's layers
        got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=NEW_TOKENS)
    finally:
        for handle in handles:
            handle.remove()

    assert_same_generation(expected, got)
    assert stats["gpu"]["staging_bytes"] > 0 and stats["timings"]["sync_gathers"] == 0, stats
    # the decode steps: the last NEW_TOKENS - 1 passes over the layers
    entries = [i for i, (kind, _) in enumerate(log) if kind == "enter"]
    decode = entries[-(NEW_TOKENS - 1) * layers :]
    checked = 0
    for step in range(NEW_TOKENS - 2):  # each step but the last, which has no next step
        for t in range(layers):
            begin = decode[step * layers + t]
            end = decode[step * layers + t + 1]
            asked = {index for kind, index in log[begin:end] if kind == "prefetch"}
            # past the last layer, the next step's: asked as `layers + i` while the step is in
            # progress (next_step), as `i` once it ended (after the last layer's append)
            wrapped = t + 2 >= layers and t + 2 - layers in asked
            assert t + 2 in asked or wrapped, (step, t, sorted(asked))
            checked += 1
    assert checked == (NEW_TOKENS - 2) * layers
