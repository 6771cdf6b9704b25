"""benchmarks/gpu_check.py's CPU mode runs end to end (so the GPU check cannot rot between GPU runs)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_mode_reports_finite_positive_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--no-tests", "--steps", "2",
               "--sizes", "2x16", "--threads", "1", "--out", str(out)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| skillfold `fold` |" in completed.stdout
    report = json.loads(out.read_text())
    assert report["failed"] == []
    [decode] = report["decode"]  # generate through the graphs' static decoder (uncaptured on a CPU) and without
    assert decode["graphs_on"]["captured"] >= 1 and decode["graphs_off"]["captured"] is None
    assert decode["graphs_on"]["generated"] == decode["graphs_off"]["generated"] == 2 * 16
    assert decode["same_rows"] == 2  # fp32: the same sampled tokens both ways
    assert set(report["cases"][0]["skillfold"]["phase_s"]) == {"rollout", "teacher", "update"}
    [case] = report["cases"]
    sides = ["skillfold"] + ([] if "trl_missing" in report else ["trl"])
    for side in sides:
        figures = case[side]
        for key in ("tokens_per_s", "s_per_step", "generated_per_step", "trained_per_step", "peak_mib", "mfu"):
            assert math.isfinite(figures[key]) and figures[key] > 0, (side, key, figures[key])
        assert figures["generated_per_step"] == 2 * 16  # every completion exactly 16 tokens
    if "trl" in sides:
        assert case["same_prompts"]
        assert all(math.isfinite(value) and value > 0 for value in case["ratios"].values())
        assert "**skillfold / TRL**" in completed.stdout
