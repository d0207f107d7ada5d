"""One process of a prefix-reuse test (tests/test_reuse_processes.py): generate through kvtier.

`python tests/reuse_worker.py JOB`, JOB a JSON object: {"store", "persist", "shared", "length",
"seed"} and optionally {"remote_url", "remote_persist", "disk_budget", "new_tokens", "tight"}
(tight: the smallest GPU tier and one host block, so the sequence streams through disk). The prompt
is `shared` tokens every worker has (seed 0) then `length - shared` of this worker's `seed`. It
builds the tiny random Llama of tests/conftest.py (same weights in every process), generates
through a TieredCache, checks it against DynamicCache in the same process and prints one JSON
line: tokens, prefix_hit_tokens, the reuse decision, bytes written to disk and any mismatch.
"""

from __future__ import annotations

import json
import sys

import torch
from conftest import (
    generation_mismatches,
    random_prompt,
    reference_generate,
    tiered_config,
    tiered_generate,
    tiny_config,
)
from transformers import AutoModelForCausalLM


def main(job: dict) -> dict:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager")
    model.eval()
    shared, length = job["shared"], job["length"]
    prompt = random_prompt(shared)
    if length > shared:
        prompt = torch.cat([prompt, random_prompt(length - shared, seed=job["seed"])], dim=1)
    options: dict = {"disk_persist": job["persist"]}
    if job.get("remote_url"):
        options |= {"remote_url": job["remote_url"], "remote_persist": job["remote_persist"]}
    if job.get("disk_budget") is not None:
        options["disk_budget"] = job["disk_budget"]
    # roomy budgets by default: the sequence stays on the GPU tier (streaming on CPU is slow)
    budgets = (
        {"gpu_blocks": None, "host_blocks": 1}
        if job.get("tight")
        else {"gpu_blocks": 16, "host_blocks": 16}
    )
    cfg = tiered_config(model.config, job["store"], length + 40, **budgets, **options)
    new_tokens = job.get("new_tokens", 6)
    got, stats = tiered_generate(model, cfg, prompt, max_new_tokens=new_tokens)
    expected = reference_generate(model, prompt, max_new_tokens=new_tokens)
    return {
        "tokens": got.sequences[0].tolist(),
        "prefix_hit_tokens": stats["prefix_hit_tokens"],
        "reuse": stats["reuse"],
        "disk_bytes_written": stats["disk"]["bytes_written"],
        "mismatches": generation_mismatches(expected, got),
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
