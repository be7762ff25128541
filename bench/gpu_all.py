"""The steps of bench/gpu_all.sh (which installs the device bundle, then runs this): every GPU check in one call.

The device's rules (shared/ENVIRONMENT.md): at most 8 files come back from $OUT, each <= 16 MiB, at most 2 folders
down, named with letters, digits, `.`, `_`, `-`; and the last 12,000 characters of output. So working data
(datasets, models, checkpoints, Ray's temp) stays under /tmp; $OUT gets one JSON per step, `summary.json` and
`logs.tar.gz`; stdout gets a `VERSIONS {...}` line first, one `STEP {...}` line with a step's key figures as soon as
it ends (its JSON is rewritten as it measures, so a step killed at its limit still reports what it measured) and a
final `SUMMARY {...}` line with every figure and every step's rc and seconds. Each step runs in its own session
(setsid) and, at its limit, everything in that session is killed (Ray's daemons and workers included) before the
next step starts. A step's limit is cut to what is left of the whole run's deadline.

Order: the most valuable figures first (training bench, serving bench, pipeline smoke, kernel checks).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 525  # from the start of gpu_all.sh (bundle setup included); the device call is given 540 s
RESERVE_S = 15  # kept for the summary and the log archive
LOG_TAIL_BYTES = 3 * 2**20  # per log in the archive
GRACE_S = 5  # SIGTERM -> SIGKILL


@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    cmd: list[str]
    result: Path  # the step's JSON in $OUT (rewritten as it measures; its "key" holds the summary figures)


def plan(dry: bool, out: Path, work: Path, py: str) -> list[Step]:
    """The four steps; `dry`: the CPU rehearsal (same scripts, CPU settings, small sizes)."""
    b = "bench/"
    if dry:  # limits: the measured rehearsal on a 2-core machine (bench/RESULTS.md) x 2-3 for a busy CI machine
        return [
            Step("train_bench", 240, [py, b + "train_throughput.py", "--size", "smoke", "--workers", "2", "--compile",
                                      "--work", str(work / "train"), "--out", str(out / "train_bench.json")],
                 out / "train_bench.json"),
            Step("serve_bench", 150, [py, b + "serve_load.py", "--shape", "mini", "--model", str(work / "serve-model"),
                                      "--max-running", "8", "--rates", "2,4", "--duration", "3",
                                      "--max-new-tokens", "32,160", "--hol-long-tokens", "64", "--max-s", "30",
                                      "--quiesce-s", "30", "--fixed-batch", "4", "--fixed-prompt-tokens", "32",
                                      "--fixed-new-tokens", "16", "--out", str(out / "serve_bench.json")],
                 out / "serve_bench.json"),
            Step("pipeline_smoke", 200, [py, b + "gpu_smoke.py", "--cpu", "--work", str(work / "smoke"),
                                         "--out", str(out / "smoke.json")], out / "smoke.json"),
            Step("kernel_checks", 60, [py, b + "gpu_checks.py", "--cpu", "--out", str(out / "kernel_checks.json")],
                 out / "kernel_checks.json"),
        ]
    return [  # the budget table in bench/RESULTS.md derives these
        Step("train_bench", 180, [py, b + "train_throughput.py", "--size", "tinyllama", "--gpu", "--workers", "1",
                                  "--compile", "--work", str(work / "train"), "--out", str(out / "train_bench.json")],
             out / "train_bench.json"),
        Step("serve_bench", 155, [py, b + "serve_load.py", "--shape", "tinyllama", "--model", str(work / "serve-model"),
                                  "--device", "cuda", "--num-gpus", "1", "--num-cpus", "4", "--max-running", "64",
                                  "--rates", "4,24", "--duration", "5", "--max-new-tokens", "128,256",
                                  "--hol-long-tokens", "128", "--max-s", "20", "--quiesce-s", "20",
                                  "--fixed-batch", "64", "--fixed-prompt-tokens", "256", "--fixed-new-tokens", "128",
                                  "--compile-static", "--out", str(out / "serve_bench.json")],
             out / "serve_bench.json"),
        Step("pipeline_smoke", 75, [py, b + "gpu_smoke.py", "--gpu", "--work", str(work / "smoke"),
                                    "--out", str(out / "smoke.json")], out / "smoke.json"),
        Step("kernel_checks", 45, [py, b + "gpu_checks.py", "--gpu", "--out", str(out / "kernel_checks.json")],
             out / "kernel_checks.json"),
    ]


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (a step's: it called setsid, so no process outside the step is in it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int) -> int:
    """SIGTERM every process of the session, SIGKILL what is left after a grace period; how many there were."""
    pids = session_pids(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline and session_pids(sid):
            time.sleep(0.2)
        if not session_pids(sid):
            break
        pids = session_pids(sid)
    return len(pids)


def read_key(result: Path) -> dict:
    try:
        return json.loads(result.read_text()).get("key", {})
    except (OSError, ValueError) as e:
        return {"result": f"unreadable: {type(e).__name__}"}


def run_step(step: Step, limit_s: float, log: Path, env: dict) -> dict:
    """Run one step in its own session with its log in `log`; at `limit_s` kill the whole session. The record
    (printed as its STEP line) holds rc, seconds, whether it timed out and the key figures of its JSON."""
    start = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_session(proc.pid)
            rc = proc.wait()
    leftovers = kill_session(proc.pid)  # a step that exited may leave daemons (Ray) holding the GPU
    return {"step": step.name, "rc": rc, "seconds": round(time.monotonic() - start, 1), "limit_s": round(limit_s),
            "timed_out": timed_out, "leftover_processes": leftovers, **read_key(step.result)}


def log_tail(log: Path, lines: int = 8, width: int = 160) -> str:
    try:
        text = log.read_bytes()[-20000:].decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("  | " + ln[:width] for ln in text)


def archive_logs(logs: Path, dest: Path) -> None:
    """One tar.gz of every log, each cut to its last LOG_TAIL_BYTES (the 16 MiB limit per returned file)."""
    with tarfile.open(dest, "w:gz") as tar:
        for log in sorted(logs.glob("*.log")):
            data = log.read_bytes()[-LOG_TAIL_BYTES:]
            info = tarfile.TarInfo(log.name)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))


def versions_line(py: str, env: dict, log: Path) -> dict:
    """The versions this run imports, probed in a child process (the orchestrator never touches CUDA)."""
    proc = subprocess.run([py, str(Path(__file__)), "--probe-versions"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    log.write_text(proc.stdout + proc.stderr)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"probe": f"failed (rc {proc.returncode}): {proc.stderr.strip()[-300:]}"}


def probe_versions() -> dict:
    import importlib
    import platform

    found: dict = {"python": platform.python_version()}
    for name in ("torch", "transformers", "ray", "deepspeed", "liger_kernel", "peft", "triton"):
        try:
            module = importlib.import_module(name)
            found[name] = getattr(module, "__version__", None) or _dist_version(name)
        except Exception as e:  # noqa: BLE001 — reported as missing, with why
            found[name] = f"missing ({type(e).__name__}: {str(e)[:120]})"
    try:
        import torch

        found["cuda"] = torch.version.cuda
        found["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001
        found["gpu"] = f"unknown ({type(e).__name__})"
    return found


def _dist_version(module: str) -> str:
    from importlib.metadata import version

    return version(module.replace("_", "-"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU rehearsal")
    p.add_argument("--probe-versions", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out")
    p.add_argument("--work", help="working data (under /tmp)")
    p.add_argument("--t0", type=float, default=None, help="when gpu_all.sh started (epoch s)")
    p.add_argument("--bundle", default="ok", help="the bundle's setup status from gpu_all.sh")
    p.add_argument("--deadline-s", type=float, default=None, help="whole run, from --t0 (default: 525 on the "
                                                                   "device, the sum of the limits in a dry run)")
    args = p.parse_args()
    if args.probe_versions:
        print(json.dumps(probe_versions()))
        return 0
    out, work = Path(args.out), Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = args.t0 or time.time()
    py = sys.executable
    env = dict(os.environ)
    steps = plan(args.dry_run, out, work, py)
    deadline = t0 + (args.deadline_s or (DEADLINE_S if not args.dry_run else sum(s.limit_s for s in steps) + 60))
    summary: dict = {"dry_run": args.dry_run, "bundle": args.bundle, "steps": {}}

    versions = versions_line(py, env, logs / "versions.log")
    summary["versions"] = versions
    print("VERSIONS " + json.dumps(versions), flush=True)
    missing = [m for m in ("ray", "deepspeed") if str(versions.get(m, "missing")).startswith("missing")]
    if not args.dry_run and (args.bundle != "ok" or missing):
        summary["fatal"] = (f"the device bundle is not usable (setup: {args.bundle}; missing: {missing or 'none'}): "
                            "build it with bench/gpu_all.sh's recipe, carry .device and run again")
        print("FATAL " + summary["fatal"], flush=True)
        return finish(summary, out, logs, t0, 2)

    status = 0
    for step in steps:
        left = deadline - time.time() - RESERVE_S
        if left < 20:
            record = {"step": step.name, "rc": None, "seconds": 0, "limit_s": 0, "skipped": "no time left"}
        else:
            record = run_step(step, min(step.limit_s, left), logs / f"{step.name}.log", env)
        summary["steps"][step.name] = record
        print("STEP " + json.dumps(record), flush=True)
        if record["rc"] != 0:
            status = 1
            print(log_tail(logs / f"{step.name}.log"), flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # partial summary as it goes
    return finish(summary, out, logs, t0, status)


def finish(summary: dict, out: Path, logs: Path, t0: float, status: int) -> int:
    summary["total_s"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    archive_logs(logs, out / "logs.tar.gz")
    print("SUMMARY " + json.dumps(summary, separators=(",", ":")), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
