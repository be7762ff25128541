"""Benchmark: reformulation, three runs on the same input doing the same output work (Algorithm 1 + Parquet).

    python bench/reformulate.py --pairs 600000 --files 8 --where local          # the end-to-end target
    python bench/reformulate.py --pairs 2000000 --files 32 --formats canonical,hh   # both input kinds, same run
    python bench/reformulate.py --pairs 2000000 --files 32 --duplicates 0.2 --runs a --also-without-duplicates
    python bench/reformulate.py --pairs 200000 --files 8 --formats canonical,hh --duplicates 0.2 --runs a0,a \
        --old-tree /tmp/old   # the resolve step against an earlier commit (git archive ... | tar -x -C /tmp/old)
    python bench/reformulate.py --pairs 1000000 --files 16 --where s3
    python bench/reformulate.py --scale --pairs 10000000 --files 80 --where s3 --duplicates 0.01 --timeout 3600

Input formats (`--formats`): `canonical` (id, question, response_1, response_2, preferences as JSON) and `hh`
(hh_rlhf_scores as `metaaligner score` writes it: prompt, chosen/rejected response, chosen/rejected_score1..3 as
float64 z-scores of rewards rounded to 0.1, no id column, zstd, 50k-row row groups).

(a) ours: the `metaaligner reformulate` CLI (Ray Data; wall time from process start, Ray start included);
(b) one process running our vectorised batch function (batch.VectorReformulator) over the same files;
(c) the plain loop: one Python process reading the same Parquet with pyarrow, Algorithm 1 per row with
    str.format (hh: the pair id "hh-" + blake2b of the texts, scores compared exactly), writing the same item
    columns to Parquet (pyarrow defaults), without validation, quarantine or duplicate check.
`--old-tree DIR` adds run (a0): the CLI from another checkout (e.g. `git archive` of an earlier commit), for a
same-run comparison of the job itself (the resolve step per deferred row with `--duplicates`).
Each run is its own process; its peak memory is the summed PSS of its process tree (Ray's GCS, raylet and
workers included; the S3 server excluded), sampled every 0.2 s, and the driver's own peak RSS (VmHWM of the
CLI process). The runs' items are checked to be the same set (an order-independent checksum of id +
objectives + prompt + target; with --duplicates only (a) and (a0), which apply the duplicate rule). With
--duplicates, (a) and (a0) report the resolve step's time per deferred row (`resolve_us_per_deferred_row`).
`--scale` runs (a) alone and reports the duplicate check's figures from the job summary. With --where s3 a local SeaweedFS server is started unless AWS_ENDPOINT_URL is set.
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


def _start_input(uri: str, pairs: int, files: int, st: Storage):
    """The seeded generator, its text pool, the input folder (created when local) and the rows per file."""
    rng = random.Random(0)
    pool = [" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(20000)]
    fs, path = st.filesystem(uri)
    if not storage.is_s3(uri):
        os.makedirs(path, exist_ok=True)
    return rng, pool, fs, path, -(-pairs // files)


def generate(uri: str, pairs: int, files: int, st: Storage, duplicates: float = 0.0) -> None:
    """`pairs` synthetic canonical pairs in `files` Parquet files; a share `duplicates` of them reuse the id of an
    earlier pair (other content), spread over all files."""
    rng, pool, fs, path, per_file = _start_input(uri, pairs, files, st)
    names = load_objective_set("ultrafeedback").names
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


def hh_table(start: int, n: int, rng: random.Random, pool: list[str], duplicates: float) -> pa.Table:
    """~1 KB hh_rlhf_scores rows as `score` writes them; a share `duplicates` repeat an earlier row's texts (the
    same pair id: ids are content digests) with their own scores."""
    import numpy as np

    prompts, chosen, rejected = [], [], []
    for i in range(start, start + n):
        j = rng.randrange(i) if duplicates and i and rng.random() < duplicates else i
        prompts.append(f"\n\nHuman: {j} {pool[j % len(pool)][:200]}?\n\nAssistant:")
        chosen.append(f" {pool[(7 * j + 1) % len(pool)]} {j}")
        rejected.append(f" {j} {pool[(13 * j + 2) % len(pool)]}")
    gen = np.random.default_rng(start)
    columns = {"prompt": prompts, "chosen_response": chosen, "rejected_response": rejected}
    for side in ("chosen", "rejected"):
        for k in (1, 2, 3):  # z-scores of rewards rounded to 0.1 (mean 0, std 1.5): equal rewards tie
            columns[f"{side}_score{k}"] = pa.array(np.round(gen.normal(0, 1.5, n), 1) / 1.5, pa.float64())
    return pa.table(columns)


def generate_hh(uri: str, pairs: int, files: int, st: Storage, duplicates: float = 0.0) -> None:
    rng, pool, fs, path, per_file = _start_input(uri, pairs, files, st)
    for k in range(files):
        n = min(per_file, pairs - k * per_file)
        first = hh_table(0, 1, rng, pool, 0.0)
        with pq.ParquetWriter(f"{path}/part-{k:04d}.parquet", first.schema, filesystem=fs, compression="zstd") as w:
            for s in range(0, n, 50000):
                w.write_table(hh_table(k * per_file + s, min(50000, n - s), rng, pool, duplicates))


FORMATS = {  # bench name -> (generator, --format, objectives, template, score decimals)
    "canonical": (generate, "canonical", "ultrafeedback", "paper", 1),
    "hh": (generate_hh, "hh_rlhf_scores", "hh_rlhf", "hh_rlhf", None),
}


# -- (c) the plain loop ------------------------------------------------------------------------------------------
def plain_loop(src: str, dst: str, fmt: str = "canonical") -> int:
    """What a careful script would do: per row json.loads (hh: the id "hh-" + blake2b of the texts, the scores
    compared exactly), group the objectives by symbol in the set's order, shuffle each group with a Fisher-Yates
    driven by blake2b(seed:id:subset), str.format the prompt."""
    from metaaligner.data.contract import ITEM_SCHEMA
    from metaaligner.prompts import get_template

    _, _, objective_set, template, _ = FORMATS[fmt]
    st = Storage()
    objectives = load_objective_set(objective_set)
    names = objectives.names
    describe = {o.name: o.render() for o in objectives.objectives}
    formats = get_template(template).formats
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
                "weak_answer": weak, "target": target, "template": template}

    def canonical(row):
        return row["id"], row["question"], row["response_1"], row["response_2"], json.loads(row["preferences"])

    def hh(row):
        q, a, b = row["prompt"], row["chosen_response"], row["rejected_response"]
        pid = "hh-" + hashlib.blake2b(f"{q}\x00{a}\x00{b}\x00".encode(), digest_size=16).hexdigest()
        prefs = {}
        for k, name in enumerate(names, start=1):
            x, y = row[f"chosen_score{k}"], row[f"rejected_score{k}"]
            prefs[name] = ">" if x > y else "<" if x < y else "="
        return pid, q, a, b, prefs

    pair_of = hh if fmt == "hh" else canonical
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
                    pid, question, r1, r2, prefs = pair_of(row)
                    groups = {s: [n for n in names if prefs.get(n) == s] for s in (">", "<", "=")}
                    if groups[">"] or groups["<"]:
                        d = hashlib.blake2b(f"{SEED}:{pid}:contrastive".encode(), digest_size=64).digest()
                        if groups[">"]:
                            out["contrastive"].append(item(pid, "better-1", "contrastive", "better",
                                                           shuffle(groups[">"], d[:32]), question, r2, r1))
                        if groups["<"]:
                            out["contrastive"].append(item(pid, "better-2", "contrastive", "better",
                                                           shuffle(groups["<"], d[32:]), question, r1, r2))
                    if groups["="]:
                        d = hashlib.blake2b(f"{SEED}:{pid}:equal".encode(), digest_size=64).digest()
                        out["equal"].append(item(pid, "equal", "equal", "equal", shuffle(groups["="], d[:32]),
                                                 question, r2, r1))
                for s in SUBSETS:
                    writers[s].write_table(pa.Table.from_pylist(out[s], schema=ITEM_SCHEMA))
        for w in writers.values():
            w.close()
    return pairs


# -- (b) our vectorised function in one process --------------------------------------------------------------------
def vectorised(src: str, dst: str, fmt: str = "canonical") -> int:
    from metaaligner.data.io.sources import Sources
    from metaaligner.data.io.parquet_writer import RowGroupWriter
    from metaaligner.data.reformulate.holdout import HoldoutSplit
    from metaaligner.data.reformulate.batch import SCHEMAS, VectorReformulator
    from metaaligner.prompts import get_template

    st = Storage()
    in_fs, _ = st.filesystem(src)
    out_fs, out_root = st.filesystem(dst)
    sources = Sources("parquet", st.list_files(src, (".parquet",)), in_fs)
    _, name, objectives, template, decimals = FORMATS[fmt]
    reformulate = VectorReformulator(name, load_objective_set(objectives), get_template(template), SEED, decimals,
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
def high_water_rss(pid: int) -> int:
    """The process's own peak resident set (VmHWM, kept by the kernel: exact, not sampled), in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


class TreePeak:
    """Peak of the summed PSS of a process and its descendants (the S3 server excluded), and the peak RSS of the
    process itself (the driver)."""

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.root, self.interval_s, self.peak, self.root_peak = psutil.Process(pid), interval_s, 0, 0
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
            self.root_peak = max(self.root_peak, high_water_rss(self.root.pid))
            self._stop.wait(self.interval_s)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.root_peak


def checksum(uri: str) -> tuple[dict, str]:
    """Items per subset and an order-independent digest of (id, objectives, prompt, target) over all items: the
    sum mod 2^64 of a 64-bit hash of each item's fields joined column-wise (no Python object per item)."""
    import numpy as np
    import pyarrow.compute as pc

    from metaaligner.data.ids.columns import hash64

    st = Storage()
    fs, root = st.filesystem(uri)
    counts, total = {}, 0
    for subset in SUBSETS:
        counts[subset] = 0
        for path in st.list_files(storage.join(uri, subset), (".parquet",)):
            with fs.open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["id", "objectives", "prompt", "target"]):
                    fields = [batch.column("id"), pc.binary_join(batch.column("objectives"), "\x1f"),
                              batch.column("prompt"), batch.column("target")]
                    joined = pc.binary_join_element_wise(*fields, "\x1e")
                    total = (total + int(hash64(joined).sum(dtype=np.uint64))) % (1 << 64)
                    counts[subset] += batch.num_rows
    return counts, f"{total:016x}"


def run(label: str, cmd: list[str], env: dict, timeout_s: float, cwd: str | None = None) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=cwd)
    peak = TreePeak(proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuntimeError(f"run {label} took longer than {timeout_s} s and was stopped") from None
    finally:
        pss, driver = peak.stop()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"run {label} failed ({proc.returncode}):\n{output[-4000:]}")
    return {"wall_s": round(wall, 2), "peak_pss_gib": round(pss / 2**30, 3),
            "driver_peak_rss_mib": round(driver / 2**20, 1), "tail": output.strip().splitlines()[-1:]}


def start_s3(workdir: str):
    if os.environ.get("AWS_ENDPOINT_URL"):
        return None
    from metaaligner.s3server import LocalS3Server

    server = LocalS3Server(directory=os.path.join(workdir, "s3")).start()
    os.environ.update(server.env)
    server.create_bucket("bench")
    return server


def run_format(fmt: str, args, root: str, env: dict) -> dict:
    """Generate one input and run the chosen runs on it (and, with --also-without-duplicates, run (a) on the same
    input made without duplicates)."""
    generator, name, objectives, template, _ = FORMATS[fmt]
    inputs = {"": args.duplicates}
    if args.also_without_duplicates and args.duplicates:
        inputs["-nodup"] = 0.0
    results = {}
    for suffix, duplicates in inputs.items():
        src = f"{root}/{fmt}-{args.pairs}{suffix}"
        t = time.perf_counter()
        generator(src, args.pairs, args.files, Storage(), duplicates)
        print(f"generated {args.pairs} {fmt} pairs ({duplicates:.1%} duplicate ids) in {args.files} Parquet files at "
              f"{src} in {time.perf_counter() - t:.1f}s", flush=True)
        labels = ["a"] if args.scale or suffix else args.runs.split(",")
        for label in labels:
            key = label + suffix
            dst = f"{root}/out-{fmt}-{key}-{args.pairs}"
            if label in ("a", "a0"):
                cmd = [sys.executable, "-m", "metaaligner.cli", "reformulate", "--input", src, "--output", dst,
                       "--format", name, "--objectives", objectives, "--template", template, "--seed", str(SEED)]
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", label, "--input", src, "--output", dst,
                       "--formats", fmt]
            run_env, cwd = env, None
            if label == "a0":  # `python -m` puts the working folder first on the path: run from the old tree
                run_env, cwd = {**env, "PYTHONPATH": args.old_tree}, args.old_tree
            r = results[key] = run(key, cmd, run_env, args.timeout, cwd)
            r["pairs_per_s"] = round(args.pairs / r["wall_s"])
            r["pairs_per_min"] = round(60 * args.pairs / r["wall_s"])
            if label in ("a", "a0"):
                summary = Storage().read_json(storage.join(dst, "_summary.json"))
                r["job"] = {k: summary.get(k) for k in ("wall_time_s", "commit_s", "timings", "duplicate_check",
                                                        "duplicates", "column_path_rows", "items_total", "work_units",
                                                        "committed_files", "uploads_completed")}
                manifest = Storage().read_json(storage.join(dst, "_SUCCESS"))
                r["job"]["output_mib"] = round(sum(f["size"] for f in manifest["files"]) / 2**20, 1)
                check = summary.get("duplicate_check") or {}
                if check.get("rows_deferred") and check.get("resolve_s") is not None:
                    r["resolve_us_per_deferred_row"] = round(1e6 * check["resolve_s"] / check["rows_deferred"], 1)
            if not (args.no_verify or args.scale):
                r["items"], r["checksum"] = checksum(dst)
            print(fmt, key, json.dumps(r), flush=True)
    if "c" in results:
        for label in results:
            results[label]["ratio_vs_c"] = round(results["c"]["wall_s"] / results[label]["wall_s"], 2)
    if "a" in results and "b" in results:
        results["a"]["ratio_vs_b"] = round(results["b"]["wall_s"] / results["a"]["wall_s"], 2)
    if "a0" in results and "a" in results and "resolve_us_per_deferred_row" in results["a"]:
        results["a"]["resolve_speedup_vs_a0"] = round(results["a0"]["resolve_us_per_deferred_row"] /
                                                      results["a"]["resolve_us_per_deferred_row"], 2)
    if "a-nodup" in results:
        results["a"]["driver_rss_vs_nodup"] = round(results["a"]["driver_peak_rss_mib"] /
                                                    results["a-nodup"]["driver_peak_rss_mib"], 3)
    # (b) and (c) have no duplicate check: with duplicate ids only the job's runs must agree
    compared = [k for k in results if not k.endswith("-nodup") and (not args.duplicates or k in ("a", "a0"))]
    same = {results[k].get("checksum") for k in compared}
    return {"same_items": len(same) == 1 if not (args.no_verify or args.scale) else None, "compared": compared,
            "runs": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=600_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--where", choices=["local", "s3"], default="local")
    ap.add_argument("--formats", default="canonical", help="input formats, in order: canonical, hh")
    ap.add_argument("--runs", default="c,b,a", help="which runs, in order (a: ours on Ray Data, b: vectorised "
                                                    "single process, c: plain loop, a0: ours from --old-tree)")
    ap.add_argument("--old-tree", help="a checkout to run as (a0), e.g. `git archive` of an earlier commit")
    ap.add_argument("--duplicates", type=float, default=0.0, help="share of pairs that reuse an earlier id")
    ap.add_argument("--also-without-duplicates", action="store_true",
                    help="with --duplicates: also run (a) on the same input made without duplicates (driver RSS)")
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
        n = (plain_loop if args.worker == "c" else vectorised)(args.input, args.output, args.formats)
        print(json.dumps({"pairs": n, "inner_s": round(time.perf_counter() - t, 2)}))
        return
    if "a0" in args.runs.split(",") and not args.old_tree:
        ap.error("run a0 needs --old-tree")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    workdir = args.workdir or tempfile.mkdtemp(prefix="ma-bench-", dir="/tmp")
    server = start_s3(workdir) if args.where == "s3" else None
    root = "s3://bench" if args.where == "s3" else workdir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    report = {"pairs": args.pairs, "files": args.files, "where": args.where, "duplicates": args.duplicates,
              "machine": f"{platform.machine()} {os.cpu_count()} cores "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB", "date": time.strftime("%Y-%m-%d %H:%M"),
              "formats": {}}
    try:
        for fmt in args.formats.split(","):
            report["formats"][fmt] = run_format(fmt, args, root, env)
    finally:
        if server:
            server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    runs = report["formats"]
    if "hh" in runs and "canonical" in runs and "a" in runs["hh"]["runs"] and "a" in runs["canonical"]["runs"]:
        walls = {fmt: runs[fmt]["runs"]["a"]["wall_s"] for fmt in ("hh", "canonical")}
        report["hh_a_vs_canonical_a"] = round(walls["canonical"] / walls["hh"], 2)  # >= 1: hh at least as fast
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
