"""GPU fidelity checks of kvtier next to DynamicCache (DESIGN.md 9): the proofs bf16 allows.

(a) teacher-forced bf16 logits: kvtier is as close to DynamicCache as DynamicCache is to itself
across runs (its kernels are not run-to-run deterministic), and with --truth as close to the
same weights run in fp32 as DynamicCache is, with its own attention and with HF's; (b) fp32
with deterministic algorithms: greedy tokens identical. Both with 75% of the KV streamed.

    python scripts/fidelity.py --truth --out $OUT/fidelity.json
    python scripts/fidelity.py --tiny --device cpu --truth --chunk 1024   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
from unittest import mock

import benchlib
import torch
from transformers import DynamicCache

import kvtier
from kvtier.hf import attention as kvtier_attention

CONTEXT = 8192
STEPS = 32


def teacher_forced(args, device: torch.device) -> dict:
    """(a) one fixed token sequence through DynamicCache three times and kvtier once (twice
    with --truth: also with kvtier's attention switched off), each compared with the others
    and, with --truth, with the same weights run in fp32 (the truth both approximate)."""
    model = benchlib.build_model(str(device), torch.bfloat16, tiny=args.tiny)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, CONTEXT + STEPS), device=device)
    store = tempfile.mkdtemp(prefix="kvtier-tf-")

    def run(cache, net=model) -> torch.Tensor:
        logits = []
        with torch.no_grad():  # the prompt in kvtier's prefill chunks, for both caches
            for start in range(0, CONTEXT, args.chunk):
                out = net(ids[:, start : min(start + args.chunk, CONTEXT)], past_key_values=cache)
            logits.append(out.logits[0, -1].float())
            for pos in range(CONTEXT, CONTEXT + STEPS - 1):
                out = net(ids[:, pos : pos + 1], past_key_values=cache)
                logits.append(out.logits[0, -1].float())
        return torch.stack(logits)

    def run_kvtier(own_attention: bool) -> tuple[torch.Tensor, dict]:
        cfg = benchlib.kvtier_config(model, CONTEXT + STEPS, 0.25, store, chunk=args.chunk)
        with contextlib.ExitStack() as stack:
            if not own_attention:  # HF's SDPA path stays (and prefill runs chunk by chunk)
                stack.enter_context(
                    mock.patch.object(kvtier_attention, "install", lambda model: False)
                )
            with kvtier.TieredCache(model, cfg) as cache:
                return run(cache), cache.stats()

    dynamic = [run(DynamicCache()) for _ in range(3)]
    ours, stats = run_kvtier(True)
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
    if getattr(args, "truth", False):
        hf_attention, _ = run_kvtier(False)
        result["kvtier_hf_attention_vs_dynamic_max_abs"] = [
            (hf_attention - d).abs().max().item() for d in dynamic
        ]
        reference = copy.deepcopy(model).float()
        del model
        truth = run(DynamicCache(), reference)
        del reference

        def error(x: torch.Tensor) -> dict:
            return {
                "max_abs": (x - truth).abs().max().item(),
                "mean_abs": (x - truth).abs().mean().item(),
                "rel_norm": ((x - truth).norm() / truth.norm()).item(),
            }

        result["vs_fp32_truth"] = {
            "dynamic": [error(d) for d in dynamic],
            "kvtier": error(ours),
            "kvtier_hf_attention": error(hf_attention),
        }
        worst = max(e["rel_norm"] for e in result["vs_fp32_truth"]["dynamic"])
        result["kvtier_as_close_to_truth_as_dynamic"] = (
            result["vs_fp32_truth"]["kvtier"]["rel_norm"] <= worst
        )
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--truth", action="store_true", help="also the fp32 truth, HF attention")
    p.add_argument("--skip-fp32", action="store_true", help="skip (b), the deterministic run")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    result = {"teacher_forced": teacher_forced(args, device)}
    if not args.skip_fp32:
        result["deterministic_fp32"] = deterministic_fp32(args, device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
