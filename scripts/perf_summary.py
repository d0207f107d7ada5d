"""Issue 8's numbers from a benchmark run: best rounds per system, the ratios, a plot.

Reads bench_decode.py's runs.jsonl (every run, as it ended), bench_long.py's long.json and the
fidelity JSON, writes the results file with the keys issue 8 asks for and a PNG of decode
tok/s and peak GPU memory against context, one line per system. Measures nothing itself.

  python scripts/perf_summary.py --runs docs/results/h200/sweep_runs.jsonl \\
      --long docs/results/h200/long_768k.json --h2d-gbps 55.2 --out docs/results/perf_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import A_B, summarize  # noqa: E402

WEIGHTS_GIB = 14.957527160644531  # the 8B shape's bf16 weights (bench_long.py reports them)
KV_BYTES_PER_TOKEN = 128 << 10  # 2 x 32 layers x 8 KV heads x 128 x 2 bytes
BLOCK_TOKENS = 256


def best_rows(runs: list[dict], new_tokens: int) -> list[dict]:
    rows = []
    for key in sorted({(r["context"], r["system"]) for r in runs}, key=lambda k: (k[0], k[1])):
        mine = [r for r in runs if (r["context"], r["system"]) == key]
        blocks = -(-(key[0] + new_tokens) // BLOCK_TOKENS)
        row = {
            "context": key[0],
            "system": key[1],
            "rounds": len(mine),
            "step_ms": min(r["step_ms"] for r in mine),
            "ttft_s": min(r["ttft_s"] for r in mine),
            "peak_over_weights_gib": min(r["peak_gib"] for r in mine) - WEIGHTS_GIB,
            "per_round_step_ms": [round(r["step_ms"], 1) for r in mine],
            "per_round_ttft_s": [round(r["ttft_s"], 2) for r in mine],
        }
        if "prefill_h2d_bytes" in mine[0]:
            row |= {
                "kv_bytes": blocks * BLOCK_TOKENS * KV_BYTES_PER_TOKEN,
                "prefill_h2d_bytes": max(r["prefill_h2d_bytes"] for r in mine),
                "streamed_bytes_per_step": min(r["decode_h2d_bytes_per_step"] for r in mine),
            }
        row["decode_tok_s"] = 1e3 / row["step_ms"]
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the A/B controls of one change (A_B) are in the table only
    systems = sorted({r["system"] for r in rows} - set(A_B))
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for system in systems:
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["context"])
        contexts = [r["context"] // 1024 for r in mine]
        speed.plot(contexts, [r["decode_tok_s"] for r in mine], marker="o", label=system)
        memory.plot(contexts, [r["peak_over_weights_gib"] for r in mine], marker="o", label=system)
    speed.set(xlabel="context (K tokens)", ylabel="decode tok/s (best round)", xscale="log")
    memory.set(xlabel="context (K tokens)", ylabel="peak GPU GiB over weights", xscale="log")
    speed.legend(fontsize=7)
    figure.suptitle("Llama-3-8B shape, bf16, one H200 (scripts/bench_decode.py)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--long", type=Path)
    p.add_argument("--fidelity", type=Path, nargs="*", default=[])
    p.add_argument("--h2d-gbps", type=float, required=True, help="the run's measured pinned H2D")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="NVIDIA H200")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path)
    args = p.parse_args()
    runs = [json.loads(line) for line in args.runs.read_text().splitlines() if line.strip()]
    rows = best_rows(runs, args.new_tokens)
    summary = summarize(rows, args.h2d_gbps)
    result: dict = {"device": args.device, "model": "Llama-3-8B shape, random bf16 weights"}
    lengths = {(r["context"], r.get("prompt_tokens", r["context"])) for r in runs}
    fresh = len(lengths) > len({context for context, _ in lengths})  # bench_decode --fresh-lengths
    result["prompt_lengths"] = (
        "fresh: every run its own" if fresh else "repeated: every run the same"
    )
    result |= {
        "decode_ratio_all_fit": summary.get("decode_ratio_all_fit_32k"),
        "step_over_floor_25": summary.get("step_over_floor_25_32k"),
        "step_over_floor_0": summary.get("step_over_floor_0_32k"),
        "ttft_ratio_32k": summary.get("ttft_ratio_32k"),
        "ttft_ratio_128k_same_chunk": summary.get("ttft_ratio_128k_same_chunk"),
    }
    if args.long:
        long = json.loads(args.long.read_text())
        result |= {
            "longest_context_tokens": long["context"] if long["completed"] else 0,
            "prefill_h2d_bytes_over_kv_bytes": long["prefill_h2d_bytes_over_kv_bytes"],
            "long_context": long,
        }
    for path in args.fidelity:
        result.setdefault("fidelity", {}).update(json.loads(path.read_text()))
    result |= {"summary": summary, "table": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
