"""The model fingerprint (kvtier/hf/models.py): every weight's every bit, config, dtype, version."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from kvtier.blocks import block_id
from kvtier.errors import UnsupportedModelError
from kvtier.hf.models import _weights_digest, fingerprint


def _model(kind: str = "llama", seed: int = 0, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(kind, **overrides)).eval()


def _nudge(tensor: torch.Tensor, index: tuple[int, ...]) -> None:
    """Move one element to the next representable value: a change of one ulp."""
    with torch.no_grad():
        value = tensor[index]
        tensor[index] = torch.nextafter(value, value + 1)


def _variant(model: torch.nn.Module, name: str, index: tuple[int, ...]) -> torch.nn.Module:
    other = copy.deepcopy(model)
    _nudge(other.get_parameter(name), index)
    return other


def test_identical_models_have_equal_fingerprints():
    """Scenario: two separately built copies of one model share blocks (same id for same tokens)."""
    first, second = _model(), _model()
    assert fingerprint(first) == fingerprint(second)
    assert fingerprint(copy.deepcopy(first)) == fingerprint(first)
    ids = [block_id(None, [5, 6, 7], fingerprint(m)) for m in (first, second)]
    assert ids[0] == ids[1]


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.1.mlp.down_proj.weight", (7, 100)),  # MLP: shapes the next layer's K/V
        ("model.layers.0.self_attn.q_proj.weight", (3, 2)),  # Q: shapes the next layer's K/V
        ("model.layers.3.self_attn.k_proj.weight", (0, 0)),  # K of the last layer
        ("lm_head.weight", (511, 63)),  # only the LM head: no K/V changes, still not shared
        ("model.norm.weight", (10,)),
        ("model.embed_tokens.weight", (4, 1)),
    ],
)
def test_one_ulp_in_one_element_changes_the_fingerprint(name: str, index: tuple[int, ...]):
    """Scenario: the old fingerprint sampled 1024 values of four k/v tensors, so two models
    differing elsewhere shared blocks and the second produced wrong tokens silently."""
    model = _model()
    other = _variant(model, name, index)
    assert fingerprint(other) != fingerprint(model)
    assert block_id(None, [5, 6], fingerprint(other)) != block_id(None, [5, 6], fingerprint(model))


def test_one_ulp_in_bf16_and_the_last_element_of_a_long_tensor():
    """Scenario: the change sits in a row tail (past the last full 64 Ki-word row) of bf16."""
    model = _model().to(torch.bfloat16)
    name = "model.embed_tokens.weight"  # 512 x 64 bf16 = 32 Ki words: one partial row
    other = _variant(model, name, (511, 63))
    assert fingerprint(other) != fingerprint(model)
    big = torch.zeros(3 * (1 << 16) + 5, dtype=torch.bfloat16)
    for position in (0, 1 << 16, 3 * (1 << 16) + 4):
        nudged = big.clone()
        _nudge(nudged, (position,))
        assert _weights_digest([("w", nudged)]) != _weights_digest([("w", big)]), position


def test_buffers_config_and_dtype_take_part():
    model = _model()
    base = fingerprint(model)
    rotary = copy.deepcopy(model)
    rotary.model.rotary_emb.inv_freq.mul_(1.0001)  # a buffer: shapes K through RoPE
    assert fingerprint(rotary) != base
    assert fingerprint(_model(rope_theta=20000.0)) != base  # same weights, other config
    assert fingerprint(copy.deepcopy(model).to(torch.float16)) != base


def test_model_key_names_the_weights_instead():
    """Scenario: with disk.model_key the weights are not read; the key (with config, dtype and
    format version) is the identity, so a changed key never shares blocks with the old one."""
    model, retrained = _model(seed=0), _model(seed=1)
    assert fingerprint(model) != fingerprint(retrained)
    key = "org/tiny@rev1"
    assert fingerprint(model, model_key=key) == fingerprint(retrained, model_key=key)
    assert fingerprint(model, model_key=key) != fingerprint(model, model_key="org/tiny@rev2")
    assert fingerprint(model, model_key=key) != fingerprint(model)
    assert fingerprint(model) == fingerprint(_model(seed=0))  # the cache keeps both apart


def test_in_place_edits_and_loaded_weights_refresh_the_cached_fingerprint():
    """Scenario: a model fine-tuned in place between two caches must not reuse the old blocks."""
    model = _model()
    before = fingerprint(model)
    _nudge(model.get_parameter("model.layers.2.mlp.up_proj.weight"), (1, 1))
    edited = fingerprint(model)
    assert edited != before
    state = _model(seed=3).state_dict()
    model.load_state_dict(state)
    assert fingerprint(model) == fingerprint(_model(seed=3)) != edited


@pytest.mark.parametrize("edit", ["scale", "merge"])
def test_edits_through_data_refresh_the_cached_fingerprint(edit: str):
    """Scenario: `.data` edits bump no version counter (PEFT merges adapters this way); the
    cached fingerprint's sample of every tensor still sees a rescaled or merged matrix."""
    model = _model()
    before = fingerprint(model)
    weight = model.get_parameter("model.layers.1.self_attn.v_proj.weight")
    version = weight._version
    if edit == "scale":
        weight.data.mul_(1.5)
    else:  # a rank-1 update, as merging a LoRA adapter adds B @ A
        weight.data += torch.randn(weight.shape[0], 1) @ torch.randn(1, weight.shape[1]) * 1e-3
    assert weight._version == version  # what the cache keyed on alone would not have seen
    assert fingerprint(model) != before
    assert fingerprint(model) == fingerprint(model)  # and it is cached again


def test_digest_is_pinned():
    """Scenario: the recipe gives the same bytes on every machine and version (no torch RNG), so
    a store outlives upgrades; a deliberate change of recipe must change FORMAT_VERSION."""
    tensors = [
        ("a", torch.arange(-70000, 70000, dtype=torch.int32)),
        ("b", torch.linspace(-1, 1, 999, dtype=torch.bfloat16)),
        ("c", torch.tensor([True, False, True])),
    ]
    assert _weights_digest(tensors).hex()[:32] == "e5de3f3ad18606f10fbdbae2d668a2af"


def test_meta_parameters_ask_for_a_model_key():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(UnsupportedModelError, match="disk.model_key"):
        fingerprint(model)
    assert fingerprint(model, model_key="org/m@1")
