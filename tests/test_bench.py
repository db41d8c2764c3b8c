"""`python -m replicas.bench` runs the real engine path on CPU and prints JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_cpu_bench_prints_json_lines(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "replicas.bench", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert printed == [json.loads(line) for line in out.read_text().splitlines()]
    cases = {row["case"]: row for row in printed}
    wanted = {"decode_b1_in128_tp1", "decode_b1_in128_tp2", "throughput_64req_in32_out32_tp2"}
    assert wanted <= set(cases)
    decode = cases["decode_b1_in128_tp1"]
    assert decode["ours"] > 0 and decode["transformers"] > 0
    ratio = decode["ours"] / decode["transformers"]
    assert abs(decode["ratio_ours_over_transformers"] - ratio) < 0.01
    assert all(row["versions"]["torch"] and row["command"] for row in printed)
