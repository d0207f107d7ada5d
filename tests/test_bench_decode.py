"""scripts/bench_decode.py and perf_summary.py end to end on a CPU (--tiny): fresh prompt
lengths, the A/B switches of kvtier's attention, and the summary of the runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvtier.hf import attention

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.slow
def test_tiny_sweep_with_fresh_lengths_and_switches(tmp_path, monkeypatch):
    """Scenario: two rounds of DynamicCache, kvtier all-fit and the three A/B rows, each run a
    new prompt length; the switches put kvtier's attention back; the depth row runs 25% with
    prefetch depth 2; the summary says the lengths were fresh and has the issue's keys."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_decode
    import perf_summary

    decode, order = attention.decode_attention, attention._kernel_order
    systems = f"kvtier 100%,{bench_decode.SDPA_DECODE},{bench_decode.CUDNN_PREFILL}"
    systems += ",kvtier 25% depth 2"
    depths = []
    config = bench_decode.benchlib.kvtier_config

    def spy(*args, **over):
        cfg = config(*args, **over)
        depths.append((args[2], cfg.policy.prefetch_depth))
        return cfg

    monkeypatch.setattr(bench_decode.benchlib, "kvtier_config", spy)
    args = ["--tiny", "--device", "cpu", "--contexts", "200", "--rounds", "2"]
    args += ["--new-tokens", "3", "--fresh-lengths", "--skip", "fidelity,profile"]
    assert bench_decode.main([*args, "--systems", systems, "--out", str(tmp_path)]) == 0
    assert (attention.decode_attention, attention._kernel_order) == (decode, order)
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 10
    assert len({run["prompt_tokens"] for run in runs}) == 10  # every run its own length
    assert depths.count((0.25, 2)) == 2 and depths.count((1.0, 1)) == 6  # the depth row
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert all(row["tokens_match_dynamic"] is None for row in sweep["rows"])
    out = tmp_path / "perf.json"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "perf_summary",
            "--runs",
            str(tmp_path / "runs.jsonl"),
            "--h2d-gbps",
            "1",
            "--out",
            str(out),
        ],
    )
    assert perf_summary.main() == 0
    summary = json.loads(out.read_text())
    assert summary["prompt_lengths"].startswith("fresh")
    assert summary["decode_ratio_all_fit"] is None  # the tiny context is "0k": no 32K key
    assert "decode_ratio_all_fit_sdpa_decode_0k" in summary["summary"]
