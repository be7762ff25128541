"""`bench/gpu_all.sh --dry-run`: the one GPU script, rehearsed on CPU with the same steps (small sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_all_dry_run_runs_every_step_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)  # the steps start their own local Ray, as on the device
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_all.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps][:3] == ["a_pipeline_smoke", "b_kernel_checks", "c_train_bench"]
    assert all(s["rc"] == 0 and s["seconds"] <= s["limit_s"] for s in steps), steps
    assert sum(s["limit_s"] for s in steps) / 2 <= 8 * 60  # on the device (half the CPU limits): 8 min + ~1 min setup

    smoke = json.loads((tmp_path / "smoke" / "smoke.json").read_text())
    assert set(smoke["training"]) == {"warmup", "equal", "contrastive"} and smoke["corrected_rows"] == 8
    assert smoke["served"] == 2 and smoke["reformulated_items"] > 0
    checks = json.loads((tmp_path / "kernel_checks.json").read_text())
    assert [(b["backend"], b["ok"]) for b in checks["backends"]] == [("sdpa", True), ("eager", True),
                                                                      ("sdpa_varlen", True)]
    bench = json.loads((tmp_path / "train_bench.json").read_text())
    assert bench["ratio_non_pad_tokens_per_s"] > 0 and bench["ours"]["padding_fraction"] == 0
    for run in ("ours", "baseline"):
        assert 0 < bench[run]["mfu"] < 1 and 0 < bench[run]["mfu_anchor"] < 1
    assert bench["baseline"]["padding_fraction"] > 0
