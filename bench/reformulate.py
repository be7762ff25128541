"""Benchmark: reformulation, three runs on the same input doing the same output work (Algorithm 1 + Parquet).

    python bench/reformulate.py --pairs 600000 --files 8 --where local          # the end-to-end target
    python bench/reformulate.py --pairs 1000000 --files 16 --where s3
    python bench/reformulate.py --scale --pairs 10000000 --files 80 --where s3 --duplicates 0.01 --timeout 3600

(a) ours: the `metaaligner reformulate` CLI (Ray Data; wall time from process start, Ray start included);
(b) one process running our vectorised batch function (vector_batch.VectorReformulator) over the same files;
(c) the plain loop: one Python process reading the same Parquet with pyarrow, Algorithm 1 per row with
    str.format, writing the same item columns to Parquet (pyarrow defaults), without validation, quarantine
    or duplicate check.
Each run is its own process; its peak memory is the summed PSS of its process tree (Ray's GCS, raylet and
workers included; the S3 server excluded), sampled every 0.2 s. The runs' items are checked to be the same
set (an order-independent checksum of id + objectives + prompt + target). `--scale` runs (a) alone and
reports the duplicate check's figures from the job summary. With --where s3 a local SeaweedFS server is
started unless AWS_ENDPOINT_URL is set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import random
import tempfile
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from metaaligner import storage  # noqa: E402
from metaaligner.storage import Storage  # noqa: E402
from metaaligner.objectives import load_objective_set  # noqa: E402

SEED, OBJECTIVES, TEMPLATE = 42, "ultrafeedback", "paper"
SUBSETS = ("contrastive", "equal")

WORDS = [w.strip() for w in "the of and to in is you that it he was for on are as with his they at be this have from "
         "or one had by word but not what all were we when your can said there use an each which she do how their if "
         "will up other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down day "
         "did get come made may part".split()]


def synthetic_table(start: int, n: int, rng: random.Random, pool: list[str], names: list[str]) -> pa.Table:
    """~1 KB pairs: question ~200 B, responses ~400 B each, 3-4 objectives with random labels."""
    ids, qs, r1s, r2s, prefs = [], [], [], [], []
    for i in range(start, start + n):
        ids.append(f"pair-{i}")
        qs.append(f"{i} {pool[rng.randrange(len(pool))][:200]}?")
        r1s.append(f"{pool[rng.randrange(len(pool))]} {i}")
        r2s.append(f"{i} {pool[rng.randrange(len(pool))]}")
        chosen = rng.sample(names, rng.choice((3, 4)))
        prefs.append(json.dumps({o: rng.choice((">", "<", "=")) for o in chosen}))
    return pa.table({"id": ids, "question": qs, "response_1": r1s, "response_2": r2s, "preferences": prefs})


def generate(uri: str, pairs: int, files: int, st: Storage, duplicates: float = 0.0) -> None:
    """`pairs` synthetic pairs in `files` Parquet files; a share `duplicates` of them reuse the id of an
    earlier pair (other content), spread over all files."""
    rng = random.Random(0)
    pool = [" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(20000)]
    names = load_objective_set("ultrafeedback").names
    fs, path = st.filesystem(uri)
    if not storage.is_s3(uri):
        os.makedirs(path, exist_ok=True)
    per_file = -(-pairs // files)
    for k in range(files):
        n = min(per_file, pairs - k * per_file)
        with pq.ParquetWriter(f"{path}/part-{k:04d}.parquet", synthetic_table(0, 1, rng, pool, names).schema,
                              filesystem=fs) as w:
            for s in range(0, n, 50000):
                table = synthetic_table(k * per_file + s, min(50000, n - s), rng, pool, names)
                if duplicates and k * per_file + s:
                    ids = table.column("id").to_pylist()
                    for i in range(len(ids)):
                        if rng.random() < duplicates:
                            ids[i] = f"pair-{rng.randrange(k * per_file + s)}"
                    table = table.set_column(0, "id", pa.array(ids))
                w.write_table(table)


# -- (c) the plain loop ------------------------------------------------------------------------------------------
def plain_loop(src: str, dst: str) -> int:
    """What a careful script would do: per row json.loads, group the objectives by symbol in the set's order,
    shuffle each group with a Fisher-Yates driven by blake2b(seed:id:subset), str.format the prompt."""
    from metaaligner.data.contract import ITEM_SCHEMA
    from metaaligner.prompts import get_template

    st = Storage()
    objectives = load_objective_set(OBJECTIVES)
    names = objectives.names
    describe = {o.name: o.render() for o in objectives.objectives}
    formats = get_template(TEMPLATE).formats
    in_fs, _ = st.filesystem(src)
    out_fs, out_root = st.filesystem(dst)

    def shuffle(group: list[str], digest: bytes) -> list[str]:
        for i in range(len(group) - 1, 0, -1):
            k = 2 * (i % (len(digest) // 2))
            j = int.from_bytes(digest[k:k + 2], "little") % (i + 1)
            group[i], group[j] = group[j], group[i]
        return group

    def item(pid, suffix, subset, condition, group, question, weak, target):
        aspects = "; ".join(describe[n] for n in group)
        return {"id": f"{pid}#{suffix}", "pair_id": pid, "subset": subset, "condition": condition, "objectives": group,
                "prompt": formats[condition].format(condition=condition, aspects=aspects, question=question,
                                                    answer=weak),
                "weak_answer": weak, "target": target, "template": TEMPLATE}

    pairs = 0
    for s in SUBSETS:
        out_fs.create_dir(f"{out_root}/{s}", recursive=True)
    for k, path in enumerate(st.list_files(src, (".parquet",))):
        writers = {s: pq.ParquetWriter(f"{out_root}/{s}/part-{k:05d}.parquet", ITEM_SCHEMA, filesystem=out_fs)
                   for s in SUBSETS}
        with in_fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=8192):
                out = {s: [] for s in SUBSETS}
                for row in batch.to_pylist():
                    pairs += 1
                    pid, prefs = row["id"], json.loads(row["preferences"])
                    groups = {s: [n for n in names if prefs.get(n) == s] for s in (">", "<", "=")}
                    if groups[">"] or groups["<"]:
                        d = hashlib.blake2b(f"{SEED}:{pid}:contrastive".encode(), digest_size=64).digest()
                        if groups[">"]:
                            out["contrastive"].append(item(pid, "better-1", "contrastive", "better",
                                                           shuffle(groups[">"], d[:32]), row["question"],
                                                           row["response_2"], row["response_1"]))
                        if groups["<"]:
                            out["contrastive"].append(item(pid, "better-2", "contrastive", "better",
                                                           shuffle(groups["<"], d[32:]), row["question"],
                                                           row["response_1"], row["response_2"]))
                    if groups["="]:
                        d = hashlib.blake2b(f"{SEED}:{pid}:equal".encode(), digest_size=64).digest()
                        out["equal"].append(item(pid, "equal", "equal", "equal", shuffle(groups["="], d[:32]),
                                                 row["question"], row["response_2"], row["response_1"]))
                for s in SUBSETS:
                    writers[s].write_table(pa.Table.from_pylist(out[s], schema=ITEM_SCHEMA))
        for w in writers.values():
            w.close()
    return pairs


# -- (b) our vectorised function in one process --------------------------------------------------------------------
def vectorised(src: str, dst: str) -> int:
    from metaaligner.data.io.sources import Sources
    from metaaligner.data.io.parquet_writer import RowGroupWriter
    from metaaligner.data.reformulate.holdout import HoldoutSplit
    from metaaligner.data.reformulate.batch import SCHEMAS, VectorReformulator
    from metaaligner.prompts import get_template

    st = Storage()
    in_fs, _ = st.filesystem(src)
    out_fs, out_root = st.filesystem(dst)
    sources = Sources("parquet", st.list_files(src, (".parquet",)), in_fs)
    reformulate = VectorReformulator("canonical", load_objective_set(OBJECTIVES), get_template(TEMPLATE), SEED, 1,
                                     HoldoutSplit(0.0, 0))
    pairs = 0
    for k in range(len(sources)):
        writers = {}
        for _, batch in sources.batches(k, 8192):
            out = reformulate(batch, sources.name(k))
            pairs += out.counts["rows_read"]
            for kind, tables in out.tables.items():
                for table in tables:
                    if kind not in writers:
                        out_fs.create_dir(f"{out_root}/{kind}", recursive=True)
                        writers[kind] = RowGroupWriter(f"{out_root}/{kind}/part-{k:05d}.parquet", SCHEMAS[kind],
                                                       filesystem=out_fs)
                    writers[kind].write(table)
        for w in writers.values():
            w.close()
    return pairs


# -- measuring ------------------------------------------------------------------------------------------------------
class TreePeak:
    """Peak of the summed PSS of a process and its descendants (the S3 server excluded)."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.root, self.interval_s, self.peak = psutil.Process(pid), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            for p in procs:
                try:
                    if p.name() != "weed":
                        total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def checksum(uri: str) -> tuple[dict, str]:
    """Items per subset and an order-independent digest of (id, objectives, prompt, target) over all items."""
    st = Storage()
    fs, root = st.filesystem(uri)
    counts, total = {}, 0
    for subset in SUBSETS:
        counts[subset] = 0
        for path in st.list_files(storage.join(uri, subset), (".parquet",)):
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["id", "objectives", "prompt", "target"]):
                    for row in batch.to_pylist():
                        h = hashlib.blake2b(json.dumps(row).encode(), digest_size=8).digest()
                        total = (total + int.from_bytes(h, "little")) % (1 << 64)
                    counts[subset] += batch.num_rows
    return counts, f"{total:016x}"


def run(label: str, cmd: list[str], env: dict, timeout_s: float) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    peak = TreePeak(proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuntimeError(f"run {label} took longer than {timeout_s} s and was stopped") from None
    finally:
        pss = peak.stop()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"run {label} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall_s": round(wall, 2), "peak_pss_gib": round(pss / 2**30, 3), "tail": output.strip().splitlines()[-1:]}


def start_s3(workdir: str):
    if os.environ.get("AWS_ENDPOINT_URL"):
        return None
    from metaaligner.s3server import LocalS3Server

    server = LocalS3Server(directory=os.path.join(workdir, "s3")).start()
    os.environ.update(server.env)
    server.create_bucket("bench")
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=600_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--where", choices=["local", "s3"], default="local")
    ap.add_argument("--runs", default="c,b,a", help="which runs, in order (a: ours on Ray Data, b: vectorised "
                                                    "single process, c: plain loop)")
    ap.add_argument("--duplicates", type=float, default=0.0, help="share of pairs that reuse an earlier id")
    ap.add_argument("--scale", action="store_true", help="run (a) alone, report the duplicate check's figures")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is stopped")
    ap.add_argument("--workdir", default=None, help="local folder for input and outputs (default: a temp dir, "
                                                    "removed at the end)")
    ap.add_argument("--no-verify", action="store_true", help="skip the same-items checksum")
    ap.add_argument("--worker", choices=["b", "c"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        t = time.perf_counter()
        n = (plain_loop if args.worker == "c" else vectorised)(args.input, args.output)
        print(json.dumps({"pairs": n, "inner_s": round(time.perf_counter() - t, 2)}))
        return

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    workdir = args.workdir or tempfile.mkdtemp(prefix="ma-bench-", dir="/tmp")
    server = start_s3(workdir) if args.where == "s3" else None
    root = "s3://bench" if args.where == "s3" else workdir
    src = f"{root}/pairs-{args.pairs}"
    t = time.perf_counter()
    generate(src, args.pairs, args.files, Storage(), args.duplicates)
    print(f"generated {args.pairs} pairs ({args.duplicates:.1%} duplicate ids) in {args.files} Parquet files at {src} "
          f"in {time.perf_counter() - t:.1f}s", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    results = {}
    try:
        for label in ["a"] if args.scale else args.runs.split(","):
            dst = f"{root}/out-{label}-{args.pairs}"
            if label == "a":
                cmd = [sys.executable, "-m", "metaaligner.cli", "reformulate", "--input", src, "--output", dst,
                       "--objectives", OBJECTIVES, "--template", TEMPLATE, "--seed", str(SEED)]
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", label, "--input", src, "--output", dst]
            r = results[label] = run(label, cmd, env, args.timeout)
            r["pairs_per_s"] = round(args.pairs / r["wall_s"])
            r["pairs_per_min"] = round(60 * args.pairs / r["wall_s"])
            if label == "a":
                summary = Storage().read_json(storage.join(dst, "_summary.json"))
                r["job"] = {k: summary.get(k) for k in ("wall_time_s", "commit_s", "timings", "duplicate_check",
                                                         "duplicates", "column_path_rows", "items_total",
                                                         "committed_files", "uploads_completed")}
                manifest = Storage().read_json(storage.join(dst, "_SUCCESS"))
                r["job"]["output_mib"] = round(sum(f["size"] for f in manifest["files"]) / 2**20, 1)
            if not (args.no_verify or args.scale):
                r["items"], r["checksum"] = checksum(dst)
            print(label, json.dumps(r), flush=True)
    finally:
        if server:
            server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if "c" in results:
        for label in results:
            results[label]["ratio_vs_c"] = round(results["c"]["wall_s"] / results[label]["wall_s"], 2)
    if "a" in results and "b" in results:
        results["a"]["ratio_vs_b"] = round(results["b"]["wall_s"] / results["a"]["wall_s"], 2)
    same = {r.get("checksum") for r in results.values()}
    report = {"pairs": args.pairs, "files": args.files, "where": args.where, "duplicates": args.duplicates,
              "machine": f"{platform.machine()} {os.cpu_count()} cores "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB", "date": time.strftime("%Y-%m-%d %H:%M"),
              "same_items": len(same) == 1 if not (args.no_verify or args.scale) else None, "runs": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
