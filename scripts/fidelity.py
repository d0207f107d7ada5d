"""GPU fidelity checks of kvtier next to DynamicCache (DESIGN.md 9): the proofs bf16 allows.

(a) teacher-forced bf16 logits: kvtier is as close to DynamicCache as DynamicCache is to itself
across runs (its kernels are not run-to-run deterministic); (b) fp32 with deterministic
algorithms: greedy tokens identical. Both with 75% of the KV streamed from host.
"""

from __future__ import annotations

import json
import os
import tempfile

import benchlib
import torch
from transformers import DynamicCache

import kvtier

CONTEXT = 8192
STEPS = 32


def teacher_forced(args, device: torch.device) -> dict:
    """(a) one fixed token sequence through DynamicCache three times and kvtier once."""
    model = benchlib.build_model(str(device), torch.bfloat16, tiny=args.tiny)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, CONTEXT + STEPS), device=device)
    store = tempfile.mkdtemp(prefix="kvtier-tf-")

    def run(cache) -> torch.Tensor:
        logits = []
        with torch.no_grad():  # the prompt in kvtier's prefill chunks, for both caches
            for start in range(0, CONTEXT, args.chunk):
                out = model(ids[:, start : min(start + args.chunk, CONTEXT)], past_key_values=cache)
            logits.append(out.logits[0, -1].float())
            for pos in range(CONTEXT, CONTEXT + STEPS - 1):
                out = model(ids[:, pos : pos + 1], past_key_values=cache)
                logits.append(out.logits[0, -1].float())
        return torch.stack(logits)

    dynamic = [run(DynamicCache()) for _ in range(3)]
    cfg = benchlib.kvtier_config(model, CONTEXT + STEPS, 0.25, store, chunk=args.chunk)
    with kvtier.TieredCache(model, cfg) as cache:
        ours = run(cache)
        stats = cache.stats()
    pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
    dyn = [(dynamic[i] - dynamic[j]).abs().max().item() for i, j in pairs]
    kv = [(ours - d).abs().max().item() for d in dynamic]
    result = {
        "context": CONTEXT,
        "steps": STEPS,
        "dynamic_vs_dynamic_max_abs": dyn,
        "kvtier_vs_dynamic_max_abs": kv,
        "kvtier_gpu_blocks": stats["gpu"]["blocks"],
        "kvtier_blocks": stats["blocks"],
        "within_dynamic_spread": max(kv) <= max(dyn),
    }
    print(json.dumps(result), flush=True)
    return result


def deterministic_fp32(args, device: torch.device) -> dict:
    """(b) greedy tokens identical in fp32 with deterministic algorithms (8-layer 8B shape)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        model = benchlib.build_model(str(device), torch.float32, tiny=args.tiny, layers=8)
        torch.manual_seed(2)
        ids = torch.randint(0, model.config.vocab_size, (1, CONTEXT), device=device)
        store = tempfile.mkdtemp(prefix="kvtier-fp32-")
        ref, _ = benchlib.timed_generate(model, ids, DynamicCache(), STEPS)
        cfg = benchlib.kvtier_config(model, CONTEXT + STEPS, 0.25, store, chunk=args.chunk)
        with kvtier.TieredCache(model, cfg) as cache:
            got, _ = benchlib.timed_generate(model, ids, cache, STEPS)
            stats = cache.stats()
    finally:
        torch.use_deterministic_algorithms(False)
    result = {
        "context": CONTEXT,
        "layers": 8,
        "new_tokens": STEPS,
        "tokens_identical": torch.equal(ref, got),
        "kvtier_gpu_blocks": stats["gpu"]["blocks"],
        "kvtier_blocks": stats["blocks"],
    }
    print(json.dumps(result), flush=True)
    return result
