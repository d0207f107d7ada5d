"""scripts/bench_reuse.py --tiny: the prefix-reuse benchmark runs end to end on CPU (its GPU run,
8B shape at 32K, is for the lent machine) and its numbers mean what they say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_reuse.py"


@pytest.mark.slow
def test_bench_reuse_tiny(tmp_path: Path) -> None:
    """Scenario: the tiny run reuses the shared prefix from another open cache (host case) and
    from disk in a new process (disk case), with the first token a whole recompute gives."""
    out = tmp_path / "reuse.json"
    args = ["--tiny", "--tokens", "640", "--store", str(tmp_path / "store"), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    shared_blocks = int(640 * 0.9) // 64  # full blocks of the shared prefix
    assert rows["cold"]["prefix_hit_tokens"] == 0 and rows["first"]["prefix_hit_tokens"] == 0
    for case in ("host", "disk"):
        reuse = rows[case]["reuse"]
        assert reuse["decision"] == "load", reuse
        assert rows[case]["prefix_hit_tokens"] == shared_blocks * 64
    assert rows["host"]["reuse"]["loaded_blocks"]["disk"] == 0  # from the open cache's memory
    assert rows["disk"]["reuse"]["loaded_blocks"]["disk"] == shared_blocks
    assert "computing the whole prompt gives: True" in done.stdout
    assert rows["fresh"]["prefix_hit_tokens"] == 0 and "in a new process: disk reuse" in done.stdout
