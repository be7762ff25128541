"""`bench/gpu_all.sh`, the one GPU-machine call, held to the device's rules: at most 8 files come back from $OUT,
each <= 16 MiB, at most 2 folders down, names of letters, digits, `.`, `_`, `-`; the last 12,000 characters of
output; 9 minutes. Its CPU rehearsal (`--dry-run`, the same steps with small sizes) runs here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_all  # noqa: E402

STEPS = ["train_bench", "serve_bench", "pipeline_smoke", "kernel_checks"]  # most valuable first
NAME = re.compile(r"[A-Za-z0-9._-]+")


def _run(tmp_path: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable, **env_extra}
    env.pop("RAY_ADDRESS", None)  # the steps start their own local Ray, as on the device
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_all.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)


def _lines(stdout: str, tag: str) -> list[dict]:
    return [json.loads(ln[len(tag) + 1:]) for ln in stdout.splitlines() if ln.startswith(tag + " ")]


def _assert_returnable(out: Path) -> list[str]:
    """What the device would bring back: every file, and nothing it would drop."""
    files = []
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        assert not path.is_symlink() and (path.is_file() or path.is_dir()), rel
        assert all(NAME.fullmatch(part) for part in rel.parts), rel
        if path.is_file():
            assert len(rel.parts) <= 3, f"{rel}: more than 2 folders down"
            assert path.stat().st_size <= 16 * 2**20, rel
            files.append(str(rel))
    assert len(files) <= 8, files
    return sorted(files)


def test_the_device_limits_fit_nine_minutes():
    """The device limits (bench/RESULTS.md's budget table) plus ~75 s of bundle setup stay within the 540 s call,
    and the run's own deadline leaves the SUMMARY time to print."""
    steps = gpu_all.plan(False, Path("/o"), Path("/w"), "python3")
    assert [s.name for s in steps] == STEPS
    assert sum(s.limit_s for s in steps) + 75 <= 540
    assert gpu_all.DEADLINE_S + gpu_all.RESERVE_S <= 540


def test_a_step_over_its_limit_loses_its_whole_session_and_keeps_what_it_measured(tmp_path):
    """Ray's reaper moves itself to a process group of its own (setpgrp): killing the step's group alone would leave
    it; the step's session goes whole. The figures written before the kill are on its STEP line."""
    result, pid_file = tmp_path / "partial.json", tmp_path / "grandchild.pid"
    script = (f"import json, subprocess, time\n"
              f"child = subprocess.Popen(['python3', '-c', 'import os, time; os.setpgrp(); time.sleep(300)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              f"open({str(result)!r}, 'w').write(json.dumps({{'key': {{'tok_s': 123}}}}))\n"
              f"time.sleep(300)\n")
    step = gpu_all.Step("slow", 300, [sys.executable, "-c", script], result)
    t0 = time.monotonic()
    record = gpu_all.run_step(step, 3, tmp_path / "slow.log", dict(os.environ))
    assert time.monotonic() - t0 < 3 + 2 * gpu_all.GRACE_S
    assert record["timed_out"] and record["rc"] != 0 and record["tok_s"] == 123
    assert _gone(int(pid_file.read_text()))


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"  # killed, not yet reaped


def test_without_the_bundle_it_says_so_at_once(tmp_path):
    proc = _run(tmp_path, GPU_ALL_BUNDLE=str(tmp_path / "no-bundle"))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("VERSIONS ") and {"torch", "cuda", "transformers", "ray", "deepspeed", "liger_kernel",
                                                 "peft", "gpu"} <= set(json.loads(lines[0][9:]))
    assert lines[1].startswith("FATAL the device bundle is not usable (setup: missing")
    summary = _lines(proc.stdout, "SUMMARY")[0]
    assert summary["fatal"] and summary["steps"] == {}
    assert _assert_returnable(tmp_path / "out") == ["logs.tar.gz", "summary.json"]


def test_dry_run_obeys_the_device_rules_and_reports_every_step(tmp_path):
    proc = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert _assert_returnable(out) == ["kernel_checks.json", "logs.tar.gz", "serve_bench.json", "smoke.json",
                                       "summary.json", "train_bench.json"]
    assert len(proc.stdout) < 12000  # the device returns the last 12,000 characters: all of it comes back
    assert proc.stdout.startswith("VERSIONS ")
    steps = _lines(proc.stdout, "STEP")
    assert [s["step"] for s in steps] == STEPS  # one line per step, as each ends, in this order
    summary = _lines(proc.stdout, "SUMMARY")[0]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("SUMMARY ")
    assert list(summary["steps"]) == STEPS and summary["steps"] == {s["step"]: s for s in steps}
    for s in steps:
        assert s["rc"] == 0 and not s["timed_out"] and s["seconds"] <= s["limit_s"], s
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"]

    train = summary["steps"]["train_bench"]
    assert train["checkpoints_written"] == 0 and train["ratio_non_pad_tokens_per_s"] > 0  # bench mode
    assert train["ratio_compiled_over_eager"] > 0 and train["kernels"] == "torch"
    for run in ("ours", "baseline", "ours_compiled"):
        assert 0 < train[run]["mfu"] < train[run]["mfu_anchor"] < 1  # the anchor counts full attention + N_total
    serve = summary["steps"]["serve_bench"]
    for engine in ("hf", "hf_static"):
        for rate in serve[engine]["rates"]:
            row = dict(zip(serve["rate_columns"], rate))
            assert row["tok_s"] > 0 and row["p95_128"] >= row["p50_128"] > 0 and row["p50_longer"] > 0
            assert row["quiesced"]  # nothing left running when the next phase starts
    assert serve["hf"]["attention"][0] == "sdpa" and serve["hf"]["attention"][1] is True  # dense mask on CPU
    assert serve["fixed_batch"]["fastest"] in ("hf", "hf_static")
    smoke = summary["steps"]["pipeline_smoke"]
    assert smoke["stages_done"] == ["reformulate", "train", "serve", "correct", "evaluate"]
    assert smoke["corrected_rows"] == 4 and smoke["served"] == 2 and smoke["evaluated"] > 0
    assert set(smoke["train_last_loss"]) == {"contrastive"}
    checks = summary["steps"]["kernel_checks"]
    assert checks["sdpa"] and checks["eager"] and checks["sdpa_varlen"] and checks["liger"].startswith("skipped")
