"""transformers' own generation tests (GenerationTesterMixin, `-m generate`) with TieredCache in
place of the default cache. Counts per model and outcome; docs/compat.md has the results.

Every `generate()` the tests make without a cache of their own (and without `use_cache=False` or
a `cache_implementation`) gets a fresh kvtier.TieredCache whose budgets leave one block on the
GPU, one on host and the rest on disk (16-token blocks, 16-token prefill chunks), sized from the
call's batch, beams and lengths. The cache is not closed: the tests read `past_key_values` of
the output, and a dropped cache frees itself when collected. A test in which no generate() ran
on kvtier is reported as such. The test files come from transformers' repository, never this
one; see docs/compat.md for how to get them and the packages they need.

  PYTHONPATH=/tmp/hf517 python scripts/hf_generation_suite.py --tests /tmp/hf-tests517 \\
      --json /tmp/suite.json                     # all five models with kvtier
  ... --default                                   # the same tests on HF's default cache
  ... --models llama -- -k beam                   # extra pytest arguments after --
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import GenerationMixin

import kvtier
from kvtier.errors import KVTierError
from kvtier.hf.models import describe, estimated_geometry
from kvtier.layout import tier_budgets

MODELS = {
    "llama": "tests/models/llama/test_modeling_llama.py",
    "qwen2": "tests/models/qwen2/test_modeling_qwen2.py",
    "qwen3": "tests/models/qwen3/test_modeling_qwen3.py",
    "gemma3": "tests/models/gemma3/test_modeling_gemma3.py",
    "phi3": "tests/models/phi3/test_modeling_phi3.py",
}
BLOCK_TOKENS = 16


# kept here, not imported from kvtier.hf.hooks, so the script also runs against older kvtier
def passed_cache(kwargs: dict) -> object:
    """The cache a call was given as `cache=` (transformers >= 5.24) or `past_key_values=`."""
    return next(
        (kwargs[n] for n in ("cache", "past_key_values") if kwargs.get(n) is not None), None
    )


def cache_keyword(model) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.24), else the old name."""
    return (
        "cache"
        if "cache" in inspect.signature(type(model).forward).parameters
        else "past_key_values"
    )


def _setting(name: str, kwargs: dict, model) -> object:
    """A generation setting as generate() will see it: the call, its config, the model's."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    config = kwargs.get("generation_config") or model.generation_config
    return getattr(config, name, None)


def small_config(model, args: tuple, kwargs: dict, store: Path) -> kvtier.Config:
    """Budgets for this call: 1 block on the GPU, 1 on host, the rest on disk."""
    source = args[0] if args and isinstance(args[0], torch.Tensor) else None
    for name in ("input_ids", "inputs_embeds"):
        source = kwargs.get(name) if source is None else source
    rows, prompt = (1, 1) if source is None else (source.shape[0], source.shape[1])
    beams = int(_setting("num_beams", kwargs, model) or 1)
    returned = int(_setting("num_return_sequences", kwargs, model) or 1)
    new = int(_setting("max_new_tokens", kwargs, model) or 0)
    longest = int(_setting("max_length", kwargs, model) or 20)
    total = prompt + max(new, longest) + BLOCK_TOKENS  # more than the call can reach
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    spec = describe(model)
    geometry = estimated_geometry(
        spec, model.config, batch=rows * beams * returned, dtype=dtype, block_tokens=BLOCK_TOKENS
    )
    budgets = tier_budgets(geometry, total, gpu_blocks=1, host_blocks=1, buffers=2)
    budgets = {name: max(size, 1 << 20) for name, size in budgets.items()}
    return kvtier.load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=BLOCK_TOKENS,
        disk_path=str(store),
        disk_codec="lz4",
        policy_name="lru",
        **budgets,
    )


class TieredEverywhere:
    """A pytest plugin: generate() on TieredCache; per-test outcomes and kvtier use."""

    def __init__(self, store: Path, *, tiered: bool) -> None:
        self.store = store
        self.tiered = tiered
        self.calls = 0  # generate() calls on a TieredCache in the running test
        self.refused: collections.Counter[str] = collections.Counter()
        self.results: list[dict] = []
        self._original = GenerationMixin.generate

    def pytest_configure(self, config) -> None:
        if not self.tiered:
            return
        original, plugin = self._original, self

        def generate(model, *args, **kwargs):
            eligible = (
                not model.config.is_encoder_decoder
                and passed_cache(kwargs) is None
                and kwargs.get("use_cache") is not False
                and _setting("cache_implementation", kwargs, model) is None
            )
            if eligible:
                try:
                    cfg = small_config(model, args, kwargs, plugin.store)
                    kwargs[cache_keyword(model)] = kvtier.TieredCache(model, cfg)
                    plugin.calls += 1
                except KVTierError as error:  # e.g. an unsupported model: HF's own cache
                    plugin.refused[f"{type(error).__name__}: {error}"[:160]] += 1
            return original(model, *args, **kwargs)

        GenerationMixin.generate = generate

    def pytest_unconfigure(self, config) -> None:
        GenerationMixin.generate = self._original

    def pytest_runtest_setup(self, item) -> None:
        self.calls = 0

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            message = ""
            if report.failed:
                message = str(report.longrepr.reprcrash.message).splitlines()[0][:240]
            elif report.skipped:
                message = str(report.longrepr[2])[:160]
            self.results.append(
                {
                    "test": report.nodeid,
                    "outcome": report.outcome,
                    "tiered_calls": self.calls,
                    "message": message,
                }
            )


def summarize(results: list[dict], tiered: bool) -> dict:
    """Counts per model and outcome; a passed test with no kvtier generate counts apart."""
    counts: dict[str, collections.Counter[str]] = {}
    for result in results:
        model = next(name for name, path in MODELS.items() if result["test"].startswith(path))
        outcome = result["outcome"]
        if tiered and outcome == "passed" and not result["tiered_calls"]:
            outcome = "passed_without_kvtier"
        counts.setdefault(model, collections.Counter())[outcome] += 1
    return {model: dict(counter) for model, counter in counts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=Path, required=True, help="transformers checkout root")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--default", action="store_true", help="HF's default cache (baseline)")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    options = parser.parse_args()
    root = options.tests.resolve()
    source = root / "src" / "transformers"  # the pipeline tests import transformers from here
    if not source.exists():
        source.parent.mkdir(exist_ok=True)
        source.symlink_to(Path(transformers.__file__).parent)
    with tempfile.TemporaryDirectory(prefix="kvtier-suite-") as store:
        plugin = TieredEverywhere(Path(store), tiered=not options.default)
        files = [str(root / MODELS[name]) for name in options.models]
        arguments = ["-m", "generate", "--noconftest", "-p", "no:cacheprovider", "-q"]
        arguments += ["-p", "no:warnings", "-o", "log_cli=false", "--rootdir", str(root)]
        start = time.perf_counter()
        code = pytest.main([*files, *arguments, *options.pytest_args], plugins=[plugin])
        seconds = time.perf_counter() - start
    report = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cache": "DynamicCache (default)" if options.default else "kvtier.TieredCache",
        "seconds": round(seconds, 1),
        "counts": summarize(plugin.results, not options.default),
        "not_tiered_calls": dict(plugin.refused),
        "failures": [r for r in plugin.results if r["outcome"] == "failed"],
        "results": plugin.results,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1))
    if options.json:
        options.json.write_text(json.dumps(report, indent=1))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
