"""kvtier/hf/shape.py: a config alone gives the tiered layers describe() finds in the model."""

from __future__ import annotations

import pytest
from conftest import KINDS, tiny_config
from transformers import T5Config

from kvtier.errors import UnsupportedModelError
from kvtier.hf.models import describe
from kvtier.hf.shape import kv_shape, read_config


@pytest.mark.parametrize("kind", KINDS)
def test_config_alone_gives_what_describe_finds(kind, tiny_model):
    """Scenario: `kvtier plan` must count the same tiered layers the cache will tier."""
    model, config = tiny_model(kind)
    shape = kv_shape(config)
    spec = describe(model)
    assert shape.sliding_windows == spec.sliding_windows
    assert shape.tiered_layers == spec.tiered_layers
    attention = model.model.layers[0].self_attn
    assert shape.head_dim == attention.head_dim
    assert shape.kv_heads == config.num_key_value_heads


def test_gemma3_sliding_layers_are_not_tiered():
    shape = kv_shape(tiny_config("gemma3"))
    assert shape.tiered_layers == (1, 3, 5) and shape.sliding_windows[0] == 32


def test_read_config_from_a_saved_directory(tmp_path):
    tiny_config("qwen3").save_pretrained(tmp_path)
    shape = kv_shape(read_config(tmp_path))
    assert shape.model_type == "qwen3" and shape.head_dim == 32 and len(shape.tiered_layers) == 4


def test_encoder_decoder_config_is_refused():
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        kv_shape(T5Config())
