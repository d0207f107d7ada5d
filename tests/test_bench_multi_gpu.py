"""scripts/bench_multi_gpu.py runs end to end on a CPU (--tiny): its checks and its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.slow
def test_tiny_cpu_smoke_run(tmp_path, monkeypatch):
    """Scenario: the two-GPU benchmark's every part on one CPU through accelerate's hooks."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_multi_gpu

    assert bench_multi_gpu.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "multi_gpu.json").read_text())
    assert result["fidelity"]["fp32"]["tokens_identical"] is True
    assert result["fidelity"]["bf16"]["within"] is True
    systems = {row["system"] for row in result["sweep"]}
    assert systems == {"DynamicCache", "kvtier 25%"}  # HF's offloaded cache needs CUDA
    assert all(row.get("step_ms") for row in result["sweep"]), result["sweep"]
    assert result["longest"]["longest_tokens"] == 512  # the --tiny cap: every context completed
    sys.modules.pop("bench_multi_gpu", None)
