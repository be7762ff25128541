"""How long the demo takes to pass its learning check with LoRA on a real pretrained model (issue 20, item 4).

Runs `metaaligner demo --quick --base-model <SmolLM2-135M-Instruct, the test fixture>` in a child process and
reports its wall time, the time per stage, and the learning check (average improvement of the per-objective
win+tie rate, target >= +20 points), next to the same figures of the tiny-model demo when `--with-tiny` is given
(same run). The fixture is test support (tests/real_model.py): downloaded and converted once per machine.

  python bench/demo_real.py                 # LoRA on SmolLM2 (quick steps: 40 / 30 / 90)
  python bench/demo_real.py --with-tiny     # and the tiny-model demo after it
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the real-model fixture is test support (tests/real_model.py)
BUDGET_S = 15 * 60  # the bar for a `demo --real`


def run_demo(output: Path, base_model: str | None, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "metaaligner.cli", "demo", "--quick", "--output", str(output)]
    cmd += ["--base-model", base_model] if base_model else []
    started = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s, capture_output=True, text=True,
                         env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    if run.returncode != 0:
        return {"wall_s": round(wall, 1), "error": run.stderr[-3000:]}
    summary = json.loads((output / "_summary.json").read_text())
    return {"wall_s": round(wall, 1), "timings_s": summary["timings_s"],
            "average_improvement_points": summary["average_improvement_points"],
            "improvement_points": summary["improvement_points"],
            "held_out_combination": summary["held_out_combination"]["improvement_points"],
            "training": {k: {m: v.get(m) for m in ("steps", "first_loss", "last_loss", "wall_time_s")}
                         for k, v in summary["training"].items()},
            "passes": summary["average_improvement_points"] >= 20}


def main() -> None:
    from real_model import smollm2_folder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--with-tiny", action="store_true", help="also run the tiny-model demo (same run)")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}",
              "date": time.strftime("%Y-%m-%d"), "budget_s": BUDGET_S}
    with tempfile.TemporaryDirectory(prefix="demo-real-") as tmp:
        report["lora_smollm2"] = run_demo(Path(tmp) / "real", str(smollm2_folder()), args.timeout)
        print(json.dumps({"lora_smollm2": report["lora_smollm2"]}), flush=True)
        if args.with_tiny:
            report["tiny"] = run_demo(Path(tmp) / "tiny", None, args.timeout)
            print(json.dumps({"tiny": report["tiny"]}), flush=True)
    real = report["lora_smollm2"]
    report["fits_budget"] = bool(real.get("passes")) and real["wall_s"] <= BUDGET_S
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
