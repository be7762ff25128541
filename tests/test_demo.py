"""The README's main command, `metaaligner demo`, in its quick setting: every stage's outputs, and learning."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image


def test_demo_runs_every_stage_and_learns(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        env.pop(k, None)  # the demo brings its own S3 server and Ray
    proc = subprocess.run([str(Path(sys.executable).parent / "metaaligner"), "demo", "--quick", "--output", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("reformulate", "train", "serve", "batch-correct", "evaluate", "learning check"):
        assert step in proc.stdout

    s = json.loads((out / "_summary.json").read_text())
    assert s["reformulation"]["valid_pairs"] == 1500 and s["reformulation"]["quarantined"] == 0
    for stage in ("warmup", "equal", "contrastive"):
        assert s["training"][stage]["steps"] > 0
        assert s["training"][stage]["last_loss"] < s["training"][stage]["first_loss"]
        assert s["training"][stage]["validation_examples"] > 0  # an eval loss on held-out rows, in the output
        assert s["training"][stage]["last_eval_loss"] < s["training"][stage]["first_eval_loss"]
        assert f"training {stage}: loss " in proc.stdout and "held-out examples" in proc.stdout
    assert (out / "models" / "corrector" / "model.safetensors").is_file()
    unseen = s["serve_samples"][2]
    assert unseen["request"]["objectives"][1]["name"] == "Brevity" and unseen["response"]["correction"]
    for name in ("results.json", "results.md", "win_rates.png", "zero_shot.png"):
        assert (out / "evaluation" / name).stat().st_size > 0
    with Image.open(out / "evaluation" / "zero_shot.png") as im:
        assert im.size == (800, 450)
    # the corrector really learned: rule-judged win rates rise on every objective, and on the held-out pair
    assert s["average_improvement_points"] >= 20
    assert all(v > 0 for v in s["held_out_combination"]["improvement_points"].values())
