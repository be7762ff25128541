"""Benchmark: reformulation S3 -> S3 on Ray Data vs a plain single-process loop, same rows, same run.

    python bench/reformulate.py --pairs 2000000 --files 16 --cpus 2

Starts a local SeaweedFS S3 server unless AWS_ENDPOINT_URL is set. Prints pairs/s for both, their
ratio, and the peak memory (PSS, all processes of the Ray job: driver, GCS, raylet, workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from metaaligner import storage
from metaaligner.config import ReformulateConfig, StorageConfig
from metaaligner.objectives import load_objective_set
from metaaligner.prompts import get_template

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


def generate(uri: str, pairs: int, files: int, st: StorageConfig) -> None:
    rng = random.Random(0)
    pool = [" ".join(rng.choice(WORDS) for _ in range(80)) for _ in range(20000)]
    names = load_objective_set("ultrafeedback").names
    fs, path = storage.filesystem(uri, st)
    per_file = -(-pairs // files)
    for k in range(files):
        n = min(per_file, pairs - k * per_file)
        with pq.ParquetWriter(f"{path}/part-{k:04d}.parquet", synthetic_table(0, 1, rng, pool, names).schema,
                              filesystem=fs) as w:
            for s in range(0, n, 50000):
                w.write_table(synthetic_table(k * per_file + s, min(50000, n - s), rng, pool, names))


def plain_loop(src: str, dst: str, st: StorageConfig, seed: int = 42) -> int:
    """The paper scripts' way: read rows, format prompt strings in Python, write JSON lines."""
    objectives = load_objective_set("ultrafeedback")
    template = get_template("paper")
    fs, path = storage.filesystem(src, st)
    out_fs, out_path = storage.filesystem(dst, st)
    n = 0
    with out_fs.open_output_stream(f"{out_path}/items.jsonl") as out:
        for f in storage.list_files(src, st, (".parquet",)):
            for batch in pq.ParquetFile(fs.open_input_file(f)).iter_batches(batch_size=8192):
                lines = []
                for row in batch.to_pylist():
                    n += 1
                    prefs = json.loads(row["preferences"])
                    for symbol, weak, target, cond in ((">", "response_2", "response_1", "better"),
                                                       ("<", "response_1", "response_2", "better"),
                                                       ("=", "response_2", "response_1", "equal")):
                        names = [o for o in objectives.names if prefs.get(o) == symbol]
                        if not names:
                            continue
                        random.Random(f"{seed}:{row['id']}:{cond}").shuffle(names)
                        prompt = template.render(cond, objectives.render(names), row["question"], row[weak])
                        lines.append(json.dumps({"id": row["id"], "objectives": names, "prompt": prompt,
                                                 "target": row[target]}))
                out.write(("\n".join(lines) + "\n").encode())
    return n


class PeakMemory:
    """Samples the summed PSS of this process and all its descendants except the S3 server."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                if p.name() != "weed":
                    total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    server = None
    if not os.environ.get("AWS_ENDPOINT_URL"):
        from metaaligner.s3server import LocalS3Server

        server = LocalS3Server().start()
        os.environ.update(server.env)
        server.create_bucket("bench")
    st = StorageConfig()
    src, dst = "s3://bench/pairs", "s3://bench/items"
    t = time.perf_counter()
    generate(src, args.pairs, args.files, st)
    print(f"generated {args.pairs} pairs in {args.files} files in {time.perf_counter() - t:.1f}s")

    import ray
    from metaaligner.data.pipeline import run_reformulation

    with PeakMemory() as mem:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        cfg = ReformulateConfig(input=src, output=dst, batch_size=args.batch_size)
        summary = run_reformulation(cfg, st)
        ray.shutdown()
    ray_rate = summary["pairs_total"] / summary["wall_time_s"]
    result = {"pairs": args.pairs, "cpus": args.cpus, "ray_wall_s": summary["wall_time_s"],
              "ray_pairs_per_s": round(ray_rate), "ray_pairs_per_min": round(ray_rate * 60),
              "ray_peak_pss_gib": round(mem.peak / 2**30, 2), "items": summary["items_total"]}
    if not args.skip_baseline:
        t = time.perf_counter()
        n = plain_loop(src, "s3://bench/plain", st)
        wall = time.perf_counter() - t
        result.update(loop_wall_s=round(wall, 2), loop_pairs_per_s=round(n / wall),
                      speedup_vs_loop=round(ray_rate / (n / wall), 2))
    print(json.dumps(result, indent=2))
    if server:
        server.stop()


if __name__ == "__main__":
    main()
